//! Runs changes: queues them per environment, walks their step trees (sequential and parallel children, static
//! and dynamic), builds each step's image, runs each step in one discarded container, applies its patches, and
//! records every transition as an [`Event`](crate::events::Event). Each concern has its own file:
//! [`seams`] (the ports), `queue` (a change's life), `steps` (claiming and running ready steps; the store
//! advances the tree), `step` (one step's work),
//! `children` (validating dynamic children), `failure` (what a stopped step's outcome is), `recorder` (events),
//! [`lease`] and `reaper` (process lifetime and crash recovery), [`crash_point`] (the crash drill's hook).

mod children;
pub mod crash_point;
mod failure;
pub mod lease;
pub mod patches;
mod queue;
mod reaper;
mod recorder;
pub mod seams;
mod services;
mod single;
mod step;
pub mod step_context;
mod steps;
pub mod worker;

pub use reaper::{reap_changes, verdict, Reaped};
pub use seams::{EventTx, ImageRequest, PreparedImage, ServiceImageRequest, Sources, StepImages};
pub use single::{CommitActions, SingleStep, SingleStepOutcome};

use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::actions::{Manifest, MANIFEST_PATHS};
use crate::app::App;
use crate::error::Result;
use crate::events::EventRecord;
use crate::executor::Executor;
use crate::store::{Change, Environment, Project};
use step_context::StepIdentity;

/// Tunables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Between SIGTERM and SIGKILL when a step is stopped.
    pub stop_grace: Duration,
    /// How often a queued change checks whether its environment is free, and a running one whether it was
    /// cancelled from another process.
    pub poll: Duration,
    /// Line, step and change caps of logs, and their retention.
    pub logs: crate::logs::LogLimits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stop_grace: Duration::from_secs(10),
            poll: Duration::from_millis(200),
            logs: crate::logs::LogLimits::default(),
        }
    }
}

/// A change to create.
#[derive(Debug, Clone)]
pub struct CreateChange {
    pub project: String,
    pub environment: String,
    pub git_rev: String,
    pub action: String,
}

/// Runs changes on behalf of one runner process (`owner`).
#[derive(Clone)]
pub struct Orchestrator {
    app: App,
    sources: Arc<dyn Sources>,
    images: Arc<dyn StepImages>,
    executor: Arc<dyn Executor>,
    owner: String,
    settings: Settings,
    live: broadcast::Sender<EventRecord>,
    /// Fires when this process's lease was found expired: it must stop and write nothing more.
    lease_lost: CancellationToken,
}

/// Everything a change's steps share while it runs, on whichever worker: read once per change and worker.
struct ChangeRun {
    change: Change,
    project: Project,
    environment: Environment,
    manifest: Manifest,
    manifest_path: String,
    repository_properties: Value,
    /// The base runner image set for the project or environment when the change started (`None`: the operator's).
    base_image: Option<String>,
    /// Every secret value the store held when this worker took the change up: masked in what its steps record.
    masker: crate::mask::Masker,
}

/// One step's run: its change's context, where its events go, and what stops it.
struct Run {
    change_run: Arc<ChangeRun>,
    events: EventTx,
    cancel: CancellationToken,
}

impl std::ops::Deref for Run {
    type Target = ChangeRun;

    fn deref(&self) -> &ChangeRun {
        &self.change_run
    }
}

impl Orchestrator {
    pub fn new(
        app: App,
        sources: Arc<dyn Sources>,
        images: Arc<dyn StepImages>,
        executor: Arc<dyn Executor>,
        settings: Settings,
    ) -> Orchestrator {
        Orchestrator {
            app,
            sources,
            images,
            executor,
            owner: uuid::Uuid::new_v4().to_string(),
            settings,
            live: broadcast::channel(4096).0,
            lease_lost: CancellationToken::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The same orchestrator acting as runner process `owner`: a background `change run` continues as the owner
    /// its change was created (or retried) for.
    pub fn with_owner(mut self, owner: String) -> Orchestrator {
        self.owner = owner;
        self
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// The id this process labels its containers with and holds a lease under.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether the executor's backend (the Docker daemon) answers now.
    pub async fn executor_available(
        &self,
    ) -> std::result::Result<(), crate::executor::ExecutorError> {
        self.executor.available().await
    }

    /// Live events of every change this process runs, after they are stored.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.live.subscribe()
    }

    async fn manifest(&self, project: &Project, sha: &str) -> Result<(Manifest, String)> {
        for path in MANIFEST_PATHS {
            if let Some(bytes) = self.sources.read_file(project, sha, path).await? {
                return Ok((Manifest::parse(path, &bytes)?, path.to_owned()));
            }
        }
        Err(crate::actions::ManifestError::Missing.into())
    }
}
