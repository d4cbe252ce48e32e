//! Runs changes: queues them per environment, walks their step trees (sequential and parallel children, static
//! and dynamic), builds each step's image, runs each step in one discarded container, applies its patches, and
//! records every transition as an [`Event`]. Crash recovery (leases, reaping) lives here too.

pub mod lease;
pub mod patches;
mod services;
mod single;
pub mod step_context;

pub use single::{SingleStep, SingleStepOutcome};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actions::{Action, Manifest, RunAs, ServiceBuild, MANIFEST_PATHS};
use crate::app::App;
use crate::error::{Error, Result};
use crate::events::{ChangeState, Event, EventRecord, Masker, Phase, StepState};
use crate::executor::{Ended, Executor, LogLine, StepRun};
use crate::properties::{self, Layers, SecretKind};
use crate::secrets::SecretValues;
use crate::store::{Change, Environment, Project, PropertiesOwner, Step, StepFinish, WrittenBy};
use step_context::StepIdentity;

/// Sends events of one change run to the recorder.
pub type EventTx = mpsc::UnboundedSender<Event>;

/// Where projects' repositories come from: resolving revisions and reading files at a commit.
pub trait Sources: Send + Sync {
    /// Brings the project's repository up to date and resolves `rev` to a full commit SHA.
    fn resolve<'a>(&'a self, project: &'a Project, rev: &'a str) -> BoxFuture<'a, Result<String>>;
    /// A file of the tree at `sha`, if it exists.
    fn read_file<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>>>;
    /// The repository's properties at `sha` for an environment: `.opschain/properties.*` deep-merged with
    /// `.opschain/environments/<env>.*`.
    fn repository_properties<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        environment: &'a str,
    ) -> BoxFuture<'a, Result<Value>>;
}

/// What a step's image is built for.
#[derive(Debug, Clone, Copy)]
pub struct ImageRequest<'a> {
    pub identity: StepIdentity<'a>,
    /// The merged properties the step sees (for `step_context_env.json`).
    pub properties: &'a Value,
    pub build_secrets: &'a SecretValues,
}

/// A step's image, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    pub image: String,
    /// Nothing was built: an image for the same content key existed.
    pub cached: bool,
}

/// A service image to build from the repository at the change's commit.
#[derive(Debug, Clone, Copy)]
pub struct ServiceImageRequest<'a> {
    pub identity: StepIdentity<'a>,
    pub service: &'a str,
    pub build: &'a ServiceBuild,
}

/// Builds (or reuses) the images a step needs. Build progress goes to `events` as [`Event::Build`].
pub trait StepImages: Send + Sync {
    /// The image the step runs in.
    fn prepare<'a>(
        &'a self,
        request: ImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;

    /// A service's image, built from the repository at the change's commit with the same builder.
    fn prepare_service<'a>(
        &'a self,
        request: ServiceImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;

    /// The image a `docker: dind` step's daemon runs from, built offline the first time it is needed.
    fn prepare_docker_daemon<'a>(
        &'a self,
        step_id: &'a str,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Between SIGTERM and SIGKILL when a step is stopped.
    pub stop_grace: Duration,
    /// How often a queued change checks whether its environment is free, and a running one whether it was
    /// cancelled from another process.
    pub poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stop_grace: Duration::from_secs(10),
            poll: Duration::from_millis(200),
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

/// What the reaper found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    pub containers: usize,
    pub changes: Vec<String>,
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
}

/// Everything a change's steps share while it runs.
struct Run {
    change: Change,
    project: Project,
    environment: Environment,
    manifest: Manifest,
    manifest_path: String,
    repository_properties: Value,
    events: EventTx,
    cancel: CancellationToken,
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
        }
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// The id this process labels its containers with and holds a lease under.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Live events of every change this process runs, after they are stored.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.live.subscribe()
    }

    /// Takes this process's lease and keeps renewing it until `stop` is cancelled; then drops it.
    pub async fn hold_lease(&self, stop: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
        let store = self.app.store.clone();
        let (owner, host, pid) = (self.owner.clone(), lease::hostname(), std::process::id());
        let renew = move |store: crate::store::Store, owner: String, host: String| async move {
            let expires = lease::now_ms() + lease::LEASE_TTL.as_millis() as i64;
            store.renew_lease(&owner, &host, pid, expires).await
        };
        renew(store.clone(), owner.clone(), host.clone()).await?;
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(lease::LEASE_RENEW) => {
                        if let Err(e) = renew(store.clone(), owner.clone(), host.clone()).await {
                            tracing::warn!(error = %e, "failed to renew the runner lease");
                        }
                    }
                }
            }
            let _ = store.drop_lease(&owner).await;
        }))
    }

    /// Removes the containers of runners that died and marks their unfinished changes failed. Never touches what
    /// a live runner owns.
    pub async fn reap(&self) -> Result<Reaped> {
        let store = &self.app.store;
        let leases = store.leases().await?;
        let (host, now) = (lease::hostname(), lease::now_ms());
        let dead =
            |owner: &str| owner != self.owner && lease::owner_is_dead(owner, &leases, &host, now);
        let mut reaped = Reaped::default();
        let mut left_overs = self.executor.left_overs().await?;
        // Containers first: a network or volume in use cannot go.
        left_overs.sort_by_key(|l| l.kind != crate::executor::LeftOverKind::Container);
        for left in left_overs {
            if left.store == store.id() && dead(&left.owner) {
                self.executor.remove(&left).await?;
                reaped.containers += 1;
            }
        }
        for change in store.unfinished_changes().await? {
            let Some(owner) = change.owner.as_deref() else {
                continue;
            };
            if !dead(owner) {
                continue;
            }
            let reason = format!("the runner process running this change ({owner}) died; its steps were stopped and removed");
            let (tx, recorder) = self.recorder(&change.id, Masker::default());
            for step in store.steps(&change.id).await? {
                if !step.state.is_final() {
                    let state = if step.state == StepState::Running {
                        StepState::Error
                    } else {
                        StepState::Aborted
                    };
                    self.finish_step(
                        &tx,
                        &step,
                        state,
                        StepFinish {
                            reason: Some(reason.clone()),
                            ..Default::default()
                        },
                    )
                    .await?;
                }
            }
            store
                .set_change_state(&change.id, ChangeState::Error, Some(&reason))
                .await?;
            let _ = tx.send(Event::ChangeState {
                state: ChangeState::Error,
                reason: Some(reason),
            });
            drop(tx);
            let _ = recorder.await;
            reaped.changes.push(change.id);
        }
        for l in leases.iter().filter(|l| dead(&l.owner)) {
            store.drop_lease(&l.owner).await?;
        }
        Ok(reaped)
    }

    /// Creates a change: resolves the revision to a SHA once (everything after uses that SHA, retries included)
    /// and checks the action exists, before anything runs.
    pub async fn create_change(&self, request: &CreateChange) -> Result<Change> {
        let store = &self.app.store;
        let project = store.project(&request.project).await?;
        let environment = store
            .environment(&request.project, &request.environment)
            .await?;
        let sha = self.sources.resolve(&project, &request.git_rev).await?;
        let (manifest, path) = self.manifest(&project, &sha).await?;
        manifest.action(&path, &request.action)?;
        let id = uuid::Uuid::new_v4().to_string();
        store
            .create_change(&crate::store::NewChange {
                id: &id,
                project_id: project.id,
                environment_id: environment.id,
                action: &request.action,
                git_rev: &request.git_rev,
                git_sha: &sha,
                root_step_id: &uuid::Uuid::new_v4().to_string(),
            })
            .await?;
        let record = store
            .append_event(
                &id,
                &Event::ChangeState {
                    state: ChangeState::Pending,
                    reason: None,
                },
            )
            .await?;
        let _ = self.live.send(record);
        Ok(store.change(&id).await?)
    }

    async fn manifest(&self, project: &Project, sha: &str) -> Result<(Manifest, String)> {
        for path in MANIFEST_PATHS {
            if let Some(bytes) = self.sources.read_file(project, sha, path).await? {
                return Ok((Manifest::parse(path, &bytes)?, path.to_owned()));
            }
        }
        Err(crate::actions::ManifestError::Missing.into())
    }

    /// Asks a change to stop. A change no live runner is running is cancelled at once.
    pub async fn cancel_change(&self, id: &str) -> Result<Change> {
        let store = &self.app.store;
        let change = store.change(id).await?;
        if change.state.is_final() {
            return Ok(change);
        }
        store.request_cancel(id).await?;
        let leases = store.leases().await?;
        let orphaned = match change.owner.as_deref() {
            None => true,
            Some(owner) => {
                owner != self.owner
                    && lease::owner_is_dead(owner, &leases, &lease::hostname(), lease::now_ms())
            }
        };
        if orphaned && matches!(change.state, ChangeState::Pending | ChangeState::Queued) {
            let (tx, recorder) = self.recorder(id, Masker::default());
            for step in store
                .steps(id)
                .await?
                .iter()
                .filter(|s| !s.state.is_final())
            {
                self.finish_step(&tx, step, StepState::Cancelled, StepFinish::default())
                    .await?;
            }
            store
                .set_change_state(
                    id,
                    ChangeState::Cancelled,
                    Some("cancelled before it started"),
                )
                .await?;
            let _ = tx.send(Event::ChangeState {
                state: ChangeState::Cancelled,
                reason: Some("cancelled before it started".into()),
            });
            drop(tx);
            let _ = recorder.await;
        }
        Ok(store.change(id).await?)
    }

    /// Makes a failed or cancelled change runnable again, at the same SHA; steps that succeeded are kept.
    pub async fn prepare_retry(&self, id: &str) -> Result<Change> {
        let store = &self.app.store;
        let change = store.change(id).await?;
        if !change.state.is_final() || change.state == ChangeState::Success {
            return Err(Error::InvalidArgument {
                what: "change state",
                value: change.state.to_string(),
                expected: "only a change that ended in error or was cancelled can be retried",
            });
        }
        store.reset_change(id).await?;
        Ok(store.change(id).await?)
    }

    /// Starts a task that stores, then broadcasts, every event sent to the returned sender, masking secrets.
    fn recorder(&self, change_id: &str, masker: Masker) -> (EventTx, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let (store, live, change_id) = (
            self.app.store.clone(),
            self.live.clone(),
            change_id.to_owned(),
        );
        let task = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let event = masker.mask_event(event);
                match store.append_event(&change_id, &event).await {
                    Ok(record) => {
                        let _ = live.send(record);
                    }
                    Err(e) => tracing::error!(error = %e, change_id, "failed to store an event"),
                }
            }
        });
        (tx, task)
    }

    /// The build and runner secrets a step gets, named by the project's and environment's properties.
    fn step_secrets(
        &self,
        project: &Value,
        environment: &Value,
        whose: &str,
    ) -> Result<(SecretValues, SecretValues)> {
        let resolve = |kind: SecretKind| -> Result<SecretValues> {
            let names = properties::secret_names(project, environment, kind).map_err(|source| {
                Error::InvalidProperties {
                    owner: whose.to_owned(),
                    source,
                }
            })?;
            Ok(self
                .app
                .secrets
                .resolve(&names, &format!("opschain.{}", kind.key()))?)
        };
        Ok((resolve(SecretKind::Build)?, resolve(SecretKind::Runner)?))
    }

    /// Every secret value the store holds: whatever a step could see is masked in what is stored and streamed.
    fn masker(&self) -> Result<Masker> {
        let mut values = Vec::new();
        for (name, _) in self.app.secrets.list()? {
            values.extend(self.app.secrets.get(&name)?.0.into_values());
        }
        Ok(Masker::new(values.iter().map(String::as_str)))
    }

    /// Runs a created (or retried) change to its end: waits for its environment, runs its step tree, and
    /// returns the change in its final state. `cancel` (or `runner change cancel` from anywhere) stops it.
    pub async fn run_change(&self, id: &str, cancel: CancellationToken) -> Result<Change> {
        let span = tracing::info_span!("change", change_id = %id);
        self.run_change_inner(id, cancel).instrument(span).await
    }

    async fn run_change_inner(&self, id: &str, cancel: CancellationToken) -> Result<Change> {
        let store = &self.app.store;
        let change = store.change(id).await?;
        let (events, recorder) = self.recorder(id, self.masker()?);
        let watch_cancel = self.watch_cancel(id, cancel.clone());
        let outcome = self.drive(change, events.clone(), cancel.clone()).await;
        watch_cancel.abort();
        let (state, reason) = match &outcome {
            Ok((state, reason)) => (*state, reason.clone()),
            Err(e) => (ChangeState::Error, Some(crate::error::error_text(e))),
        };
        store.set_change_state(id, state, reason.as_deref()).await?;
        let _ = events.send(Event::ChangeState { state, reason });
        drop(events);
        let _ = recorder.await;
        Ok(store.change(id).await?)
    }

    /// Cancels `cancel` when the change's cancel flag is set in the store (by any process).
    fn watch_cancel(&self, id: &str, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (store, id, poll) = (self.app.store.clone(), id.to_owned(), self.settings.poll);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
                if matches!(store.change(&id).await, Ok(c) if c.cancel_requested) {
                    cancel.cancel();
                    return;
                }
            }
        })
    }

    async fn drive(
        &self,
        change: Change,
        events: EventTx,
        cancel: CancellationToken,
    ) -> Result<(ChangeState, Option<String>)> {
        let store = &self.app.store;
        store
            .set_change_state(&change.id, ChangeState::Queued, None)
            .await?;
        let _ = events.send(Event::ChangeState {
            state: ChangeState::Queued,
            reason: None,
        });
        while !store.claim_environment(&change.id, &self.owner).await? {
            tokio::select! {
                _ = cancel.cancelled() => return Ok((ChangeState::Cancelled, Some("cancelled while queued".into()))),
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
        }
        let _ = events.send(Event::ChangeState {
            state: ChangeState::Running,
            reason: None,
        });
        let project = store.project(&change.project).await?;
        let environment = store
            .environment(&change.project, &change.environment)
            .await?;
        let (manifest, manifest_path) = self.manifest(&project, &change.git_sha).await?;
        let repository_properties = self
            .sources
            .repository_properties(&project, &change.git_sha, &environment.code)
            .await?;
        let root = store
            .steps(&change.id)
            .await?
            .into_iter()
            .find(|s| s.parent_id.is_none())
            .expect("every change has a root step");
        let run = Arc::new(Run {
            change,
            project,
            environment,
            manifest,
            manifest_path,
            repository_properties,
            events,
            cancel,
        });
        let (state, reason) = self.run_tree(run.clone(), root).await?;
        Ok(match state {
            StepState::Success => (ChangeState::Success, None),
            StepState::Cancelled => (ChangeState::Cancelled, Some("cancelled".into())),
            _ => (ChangeState::Error, reason),
        })
    }

    /// Runs a step and then its children; returns its final state and, on failure, why.
    fn run_tree(
        &self,
        run: Arc<Run>,
        step: Step,
    ) -> BoxFuture<'_, Result<(StepState, Option<String>)>> {
        async move {
            let store = &self.app.store;
            // On a retry, a step whose own work succeeded earlier (it recorded its children) is not run again; its
            // subtree carries on from whatever did not succeed.
            if step.state == StepState::Success || step.children_strategy.is_some() {
                let strategy = match step.children_strategy.as_deref() {
                    Some("parallel") => RunAs::Parallel,
                    _ => RunAs::Sequential,
                };
                let children: Vec<Step> = store.steps(&run.change.id).await?.into_iter().filter(|s| s.parent_id.as_deref() == Some(&step.id)).collect();
                return self.run_children(run, &step, children, strategy).await;
            }
            if run.cancel.is_cancelled() {
                self.finish_step(&run.events, &step, StepState::Cancelled, StepFinish::default()).await?;
                return Ok((StepState::Cancelled, Some("cancelled".into())));
            }
            let action = run.manifest.action(&run.manifest_path, &step.action)?.clone();
            let span = tracing::info_span!("step", change_id = %run.change.id, step_id = %step.id, action = %step.action);
            let own = self.run_own(&run, &step, &action).instrument(span).await?;
            let children = match own {
                Own::Failed(state, reason) => return Ok((state, Some(reason))),
                Own::Succeeded(children) => children,
            };
            let strategy = children.1;
            if children.0.is_empty() {
                if action.run.is_none() {
                    self.finish_step(&run.events, &step, StepState::Success, StepFinish::default())
                        .await?;
                }
                return Ok((StepState::Success, None));
            }
            let ids: Vec<(String, String)> = children.0.iter().map(|a| (uuid::Uuid::new_v4().to_string(), a.clone())).collect();
            store.set_children(&run.change.id, &step.id, strategy_text(strategy), &ids).await?;
            let children: Vec<Step> = store.steps(&run.change.id).await?.into_iter().filter(|s| s.parent_id.as_deref() == Some(&step.id)).collect();
            self.run_children(run, &step, children, strategy).await
        }
        .boxed()
    }

    async fn run_children(
        &self,
        run: Arc<Run>,
        parent: &Step,
        children: Vec<Step>,
        strategy: RunAs,
    ) -> Result<(StepState, Option<String>)> {
        let ignored = |step: &Step| {
            run.manifest
                .actions
                .get(&step.action)
                .is_some_and(|a| a.ignore_failure)
        };
        let mut failure: Option<(StepState, String)> = None;
        match strategy {
            RunAs::Sequential => {
                for child in children {
                    if let Some((state, _)) = &failure {
                        if child.state != StepState::Success {
                            let aborted = if *state == StepState::Cancelled {
                                StepState::Cancelled
                            } else {
                                StepState::Aborted
                            };
                            self.finish_step(
                                &run.events,
                                &child,
                                aborted,
                                StepFinish {
                                    reason: Some("an earlier sibling failed".into()),
                                    ..Default::default()
                                },
                            )
                            .await?;
                        }
                        continue;
                    }
                    let action = child.action.clone();
                    let ignore = ignored(&child);
                    let (state, reason) = self.run_tree(run.clone(), child).await?;
                    if state != StepState::Success && !ignore {
                        failure = Some((
                            state,
                            reason.unwrap_or_else(|| format!("step {action} failed")),
                        ));
                    }
                }
            }
            RunAs::Parallel => {
                let results = futures::future::join_all(children.into_iter().map(|child| {
                    let ignore = ignored(&child);
                    let action = child.action.clone();
                    self.run_tree(run.clone(), child)
                        .map(move |r| (r, ignore, action))
                }))
                .await;
                for (result, ignore, action) in results {
                    let (state, reason) = result?;
                    if state != StepState::Success
                        && !ignore
                        && failure
                            .as_ref()
                            .is_none_or(|(s, _)| *s == StepState::Cancelled)
                    {
                        failure = Some((
                            state,
                            reason.unwrap_or_else(|| format!("step {action} failed")),
                        ));
                    }
                }
            }
        }
        let (state, reason) = match failure {
            None => (StepState::Success, None),
            Some((StepState::Cancelled, reason)) => (StepState::Cancelled, Some(reason)),
            Some((_, reason)) => (StepState::Error, Some(reason)),
        };
        if parent.state != StepState::Success || state != StepState::Success {
            self.finish_step(
                &run.events,
                parent,
                state,
                StepFinish {
                    reason: reason.clone(),
                    ..Default::default()
                },
            )
            .await?;
        }
        Ok((state, reason))
    }

    async fn finish_step(
        &self,
        events: &EventTx,
        step: &Step,
        state: StepState,
        finish: StepFinish,
    ) -> Result<()> {
        self.app.store.finish_step(&step.id, state, &finish).await?;
        let _ = events.send(Event::StepState {
            step_id: step.id.clone(),
            parent_id: step.parent_id.clone(),
            action: step.action.clone(),
            state,
            reason: finish.reason,
        });
        Ok(())
    }

    fn phase(events: &EventTx, step: &Step, phase: Phase, message: String) {
        let _ = events.send(Event::Phase {
            step_id: step.id.clone(),
            phase,
            message,
        });
    }

    /// A step's own work: properties, image, container, patches. Children are its caller's business.
    async fn run_own(&self, run: &Run, step: &Step, action: &Action) -> Result<Own> {
        let store = &self.app.store;
        let events = &run.events;
        let project_owner: PropertiesOwner = (&run.project).into();
        let environment_owner: PropertiesOwner = (&run.environment).into();
        let project_props = store.properties(&project_owner, None).await?;
        let environment_props = store.properties(&environment_owner, None).await?;
        store
            .start_step(&step.id, project_props.version, environment_props.version)
            .await?;
        let _ = events.send(Event::StepState {
            step_id: step.id.clone(),
            parent_id: step.parent_id.clone(),
            action: step.action.clone(),
            state: StepState::Running,
            reason: None,
        });
        let fail = |state: StepState, reason: String| async move {
            self.finish_step(
                events,
                step,
                state,
                StepFinish {
                    reason: Some(reason.clone()),
                    ..Default::default()
                },
            )
            .await?;
            Ok::<_, Error>(Own::Failed(state, reason))
        };

        let static_children = action.steps.clone();
        let Some(_) = &action.run else {
            // A pure grouping action: nothing to build or run; its state follows its children.
            return Ok(Own::Succeeded((static_children, action.run_as)));
        };

        let view = properties::layered_view(&Layers {
            repository_project: Some(&run.repository_properties),
            repository_environment: None,
            project: Some(&project_props.document),
            environment: Some(&environment_props.document),
        });
        let (build_secrets, runner_secrets) = match self.step_secrets(
            &project_props.document,
            &environment_props.document,
            "project/environment",
        ) {
            Ok(secrets) => secrets,
            Err(e) => return fail(StepState::Error, crate::error::error_text(&e)).await,
        };
        let identity = StepIdentity {
            project: &run.project,
            environment: &run.environment,
            change: &run.change,
            step_id: &step.id,
            action: &step.action,
        };

        Self::phase(
            events,
            step,
            Phase::BuildStarted,
            format!("building the runner image for step {}", step.action),
        );
        let started = Instant::now();
        let request = ImageRequest {
            identity,
            properties: &view,
            build_secrets: &build_secrets,
        };
        let image = match self
            .images
            .prepare(request, events.clone(), run.cancel.clone())
            .await
        {
            Ok(image) => image,
            Err(e) if run.cancel.is_cancelled() => {
                return fail(
                    StepState::Cancelled,
                    format!("cancelled while building: {}", crate::error::error_text(&e)),
                )
                .await
            }
            Err(e) => {
                return fail(
                    StepState::Error,
                    format!(
                        "failed to build runner image for step {}: {}",
                        step.action,
                        crate::error::error_text(&e)
                    ),
                )
                .await
            }
        };
        store
            .set_step_image(&step.id, &image.image, image.cached)
            .await?;
        let beside = match self
            .prepare_beside(identity, action, events, &run.cancel)
            .await
        {
            Ok(beside) => beside,
            Err(e) if run.cancel.is_cancelled() => {
                return fail(
                    StepState::Cancelled,
                    format!("cancelled while building: {}", crate::error::error_text(&e)),
                )
                .await
            }
            Err(e) => return fail(StepState::Error, crate::error::error_text(&e)).await,
        };
        Self::phase(
            events,
            step,
            Phase::BuildFinished,
            format!(
                "runner image {} in {:.2} s{}",
                image.image,
                started.elapsed().as_secs_f64(),
                if image.cached { " (cached)" } else { "" }
            ),
        );

        let step_run = StepRun {
            change_id: run.change.id.clone(),
            step_id: step.id.clone(),
            owner: self.owner.clone(),
            store: store.id().to_owned(),
            image: image.image.clone(),
            step_context: step_context::step_context(
                &identity,
                &run.repository_properties,
                &project_props.document,
                &environment_props.document,
                action,
            ),
            secrets: runner_secrets,
            timeout: action.timeout,
            stop_grace: self.settings.stop_grace,
            services: beside.services,
            docker: beside.docker,
        };
        Self::phase(
            events,
            step,
            Phase::RunStarted,
            format!("running step {} in a new container", step.action),
        );
        let started = Instant::now();
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<LogLine>();
        let forward = {
            let (events, step_id) = (events.clone(), step.id.clone());
            tokio::spawn(async move {
                while let Some(LogLine { stream, line }) = log_rx.recv().await {
                    let _ = events.send(Event::Log {
                        step_id: step_id.clone(),
                        stream,
                        line,
                    });
                }
            })
        };
        let outcome = self
            .executor
            .run_step(&step_run, log_tx, run.cancel.child_token())
            .await;
        let _ = forward.await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => return fail(StepState::Error, crate::error::error_text(&e)).await,
        };
        let seconds = started.elapsed().as_secs_f64();
        Self::phase(
            events,
            step,
            Phase::RunFinished,
            format!(
                "step {} finished with exit code {} in {seconds:.2} s",
                step.action, outcome.exit_code
            ),
        );
        match outcome.ended {
            Ended::Cancelled => return fail(StepState::Cancelled, "cancelled".into()).await,
            Ended::TimedOut => {
                let limit = action
                    .timeout
                    .map(crate::actions::format_duration)
                    .unwrap_or_default();
                return fail(
                    StepState::Error,
                    format!("step {} timed out after {limit}", step.action),
                )
                .await;
            }
            Ended::Exited if outcome.exit_code != 0 => {
                return fail(
                    StepState::Error,
                    format!(
                        "step {} exited with code {}",
                        step.action, outcome.exit_code
                    ),
                )
                .await;
            }
            Ended::Exited => {}
        }
        let result = outcome.result.unwrap_or(Value::Null);
        let step_patches = match patches::patches_from_result(&result) {
            Ok(p) => p,
            Err(e) => {
                return fail(
                    StepState::Error,
                    format!("step {} left an invalid step_result.json: {e}", step.action),
                )
                .await
            }
        };
        let by = WrittenBy::Change {
            change_id: run.change.id.clone(),
            step_id: step.id.clone(),
        };
        if let Err(e) = patches::apply_step_patches(
            store,
            (&project_owner, project_props.version),
            (&environment_owner, environment_props.version),
            &step_patches,
            &by,
        )
        .await
        {
            return fail(StepState::Error, e.to_string()).await;
        }
        let (dynamic, strategy) = match dynamic_children(&result) {
            Ok(found) => found,
            Err(e) => {
                return fail(
                    StepState::Error,
                    format!("step {} left an invalid step_result.json: {e}", step.action),
                )
                .await
            }
        };
        for child in &dynamic {
            if let Err(e) = run.manifest.action(&run.manifest_path, child) {
                return fail(
                    StepState::Error,
                    format!("step {} asked for a child step: {e}", step.action),
                )
                .await;
            }
        }
        let properties = result.pointer("/step/properties").cloned();
        let children: Vec<String> = static_children.into_iter().chain(dynamic).collect();
        let state = StepState::Success;
        self.app
            .store
            .finish_step(
                &step.id,
                state,
                &StepFinish {
                    exit_code: Some(outcome.exit_code),
                    reason: None,
                    properties,
                },
            )
            .await?;
        if children.is_empty() {
            let _ = events.send(Event::StepState {
                step_id: step.id.clone(),
                parent_id: step.parent_id.clone(),
                action: step.action.clone(),
                state,
                reason: None,
            });
        }
        Ok(Own::Succeeded((
            children,
            strategy.unwrap_or(action.run_as),
        )))
    }
}

enum Own {
    Failed(StepState, String),
    /// The children to run next and how.
    Succeeded((Vec<String>, RunAs)),
}

fn strategy_text(strategy: RunAs) -> &'static str {
    match strategy {
        RunAs::Sequential => "sequential",
        RunAs::Parallel => "parallel",
    }
}

/// `steps.children[].action` and `steps.child_execution_strategy` of a step result.
fn dynamic_children(result: &Value) -> std::result::Result<(Vec<String>, Option<RunAs>), String> {
    let children = match result.pointer("/steps/children") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.get("action")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("steps.children entry {item} has no \"action\" string"))
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(other) => return Err(format!("steps.children must be a list, found {other}")),
    };
    let strategy = match result.pointer("/steps/child_execution_strategy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "parallel" => Some(RunAs::Parallel),
        Some(Value::String(s)) if s == "sequential" => Some(RunAs::Sequential),
        Some(other) => {
            return Err(format!(
            "steps.child_execution_strategy must be \"sequential\" or \"parallel\", found {other}"
        ))
        }
    };
    Ok((children, strategy))
}
