//! One step for an external scheduler that owns its own change model (`StepRunnerService.RunStep`): build the
//! image from the repository at the revision, run the action in one discarded container, hand back its
//! `step_result.json`. Patches are not applied: the caller owns its properties.

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{step_context, ImageRequest, Orchestrator, StepIdentity};
use crate::error::{Error, Result};
use crate::events::{ChangeState, Event, Phase};
use crate::executor::{LogLine, StepRun};
use crate::policy::Subject;
use crate::properties::{self, Layers, SecretKind};
use crate::store::{Change, Environment, Project};

/// What a scheduler asks for.
#[derive(Debug, Clone)]
pub struct SingleStep {
    pub git_remote: String,
    pub git_rev: String,
    pub action: String,
    /// seed 003's `step_context.json`: `context`, `project.properties`, `environment.properties`.
    pub step_context: Value,
}

/// What the step left.
#[derive(Debug, Clone, PartialEq)]
pub struct SingleStepOutcome {
    /// Whether the step exited, hit its timeout or was cancelled.
    pub ended: crate::executor::Ended,
    pub exit_code: i64,
    pub git_sha: String,
    pub image: String,
    pub image_cached: bool,
    pub result: Option<Value>,
}

fn text<'a>(doc: &'a Value, pointer: &str, default: &'a str) -> &'a str {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or(default)
}

/// The project a remote stands for when a scheduler names a repository without registering it: its mirror is
/// keyed by the remote.
fn remote_project(git_remote: &str) -> Project {
    let key = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(git_remote.as_bytes())[..6])
    };
    Project {
        id: 0,
        code: format!("remote-{key}"),
        name: String::new(),
        git_remote: Some(git_remote.to_owned()),
        git_credential: None,
        created_at: String::new(),
    }
}

/// The actions of a repository at a commit.
#[derive(Debug, Clone)]
pub struct CommitActions {
    pub git_sha: String,
    /// Where the manifest was found (e.g. `.opschain/actions.json`).
    pub path: String,
    pub manifest: crate::actions::Manifest,
}

impl Orchestrator {
    /// The action tree of a registered project (`project`) or, as RunStep may reach it, of a remote
    /// (`git_remote`), at a revision resolved to its SHA.
    pub async fn commit_actions(
        &self,
        project: Option<&str>,
        git_remote: Option<&str>,
        rev: &str,
    ) -> Result<CommitActions> {
        let project = match (project, git_remote) {
            (Some(code), _) => self.app.store.project(code).await?,
            (None, Some(remote)) => {
                self.app.policy.require_run_step_remote(remote)?;
                remote_project(remote)
            }
            (None, None) => {
                return Err(Error::InvalidArgument {
                    what: "project",
                    value: String::new(),
                    expected: "give a project or a git_remote",
                })
            }
        };
        let rev = if rev.is_empty() { "HEAD" } else { rev };
        let git_sha = self.sources.resolve(&project, rev).await?;
        let (manifest, path) = self.manifest(&project, &git_sha).await?;
        Ok(CommitActions {
            git_sha,
            path,
            manifest,
        })
    }

    /// What can be refused before anything is fetched: a remote or a secret `[run_step]` of the operator's
    /// policy does not allow. (The action's Docker access and services are checked once the manifest is read.)
    pub fn check_single_step(&self, request: &SingleStep) -> Result<()> {
        self.app
            .policy
            .require_run_step_remote(&request.git_remote)?;
        let empty = json!({});
        let project = request
            .step_context
            .pointer("/project/properties")
            .unwrap_or(&empty);
        let environment = request
            .step_context
            .pointer("/environment/properties")
            .unwrap_or(&empty);
        for kind in [SecretKind::Build, SecretKind::Runner] {
            self.granted_secret_names(
                Subject::RunStep,
                project,
                environment,
                "step context",
                kind,
            )?;
        }
        Ok(())
    }

    /// Runs one step outside any stored change; progress goes to `sink`, masked, output as capped lines (step id:
    /// the context's, or a new one). `sink` is bounded: a slow reader slows the step's output.
    pub async fn run_single_step(
        &self,
        request: &SingleStep,
        sink: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> Result<SingleStepOutcome> {
        if request.git_remote.is_empty() || request.action.is_empty() {
            return Err(Error::InvalidArgument {
                what: "RunStep request",
                value: format!(
                    "remote {:?}, action {:?}",
                    request.git_remote, request.action
                ),
                expected: "give git_remote, git_rev and action",
            });
        }
        self.check_single_step(request)?;
        let context = &request.step_context;
        let mut project = remote_project(&request.git_remote);
        project.name = text(context, "/context/project/name", "").to_owned();
        let environment = Environment {
            id: 0,
            project_code: project.code.clone(),
            code: text(context, "/context/environment/code", "scheduler").to_owned(),
            name: text(context, "/context/environment/name", "").to_owned(),
            created_at: String::new(),
        };
        let rev = if request.git_rev.is_empty() {
            "HEAD"
        } else {
            &request.git_rev
        };
        let sha = self.sources.resolve(&project, rev).await?;
        let (manifest, path) = self.manifest(&project, &sha).await?;
        let action = manifest.action(&path, &request.action)?.clone();
        self.app.policy.require_action(Subject::RunStep, &action)?;
        let change = Change {
            id: text(context, "/context/change/id", "").to_owned(),
            project: project.code.clone(),
            environment: environment.code.clone(),
            action: request.action.clone(),
            git_rev: rev.to_owned(),
            git_sha: sha.clone(),
            state: ChangeState::Running,
            reason: None,
            owner: Some(self.owner.clone()),
            cancel_requested: false,
            attempt: 1,
            created_at: String::new(),
            started_at: None,
            finished_at: None,
        };
        let step_id = match text(context, "/context/step/id", "") {
            "" => uuid::Uuid::new_v4().to_string(),
            id => id.to_owned(),
        };
        let identity = StepIdentity {
            project: &project,
            environment: &environment,
            change: &change,
            step_id: &step_id,
            action: &request.action,
        };
        let project_props = context
            .pointer("/project/properties")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let environment_props = context
            .pointer("/environment/properties")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let repository = self
            .sources
            .repository_properties(&project, &sha, &environment.code)
            .await?;
        let view = properties::layered_view(&Layers {
            repository_project: Some(&repository),
            repository_environment: None,
            project: Some(&project_props),
            environment: Some(&environment_props),
        });
        let (build_secrets, runner_secrets) = self.step_secrets(
            Subject::RunStep,
            &project_props,
            &environment_props,
            "step context",
        )?;
        let (events, pipe) = crate::logs::pipe(self.masker()?, self.settings.logs, sink);
        let emit = |event: Event| {
            let _ = events.send(event);
        };
        let phase = |phase: Phase, message: String| {
            emit(Event::Phase {
                step_id: step_id.clone(),
                phase,
                message,
            })
        };

        phase(
            Phase::BuildStarted,
            format!("building the runner image for step {}", request.action),
        );
        let image = self
            .images
            .prepare(
                ImageRequest {
                    identity,
                    properties: &view,
                    build_secrets: &build_secrets,
                    base_image: None,
                },
                events.clone(),
                cancel.clone(),
            )
            .await;
        let image = match image {
            Ok(image) => self
                .prepare_beside(identity, None, &action, &events, &cancel)
                .await
                .map(|beside| (image, beside)),
            Err(e) => Err(e),
        };
        let (image, beside) = image?;
        phase(
            Phase::BuildFinished,
            format!(
                "runner image {}{}",
                image.image,
                if image.cached { " (cached)" } else { "" }
            ),
        );

        let mut step_context = step_context::step_context(
            &identity,
            &repository,
            &project_props,
            &environment_props,
            &action,
        );
        if let Some(given) = context.get("context") {
            step_context["context"] = given.clone();
        }
        let run = StepRun {
            change_id: if change.id.is_empty() {
                format!("runstep-{step_id}")
            } else {
                change.id.clone()
            },
            step_id: step_id.clone(),
            owner: self.owner.clone(),
            store: self.app.store.id().to_owned(),
            image: image.image.clone(),
            step_context,
            secrets: runner_secrets,
            timeout: action.timeout,
            stop_grace: self.settings.stop_grace,
            services: beside.services,
            docker: beside.docker,
            resources: Some(
                self.app
                    .policy
                    .action_resources(Subject::RunStep, &action)?,
            ),
        };
        phase(
            Phase::RunStarted,
            format!("running step {} in a new container", request.action),
        );
        let (log_tx, mut log_rx) = mpsc::channel::<LogLine>(crate::executor::LOG_CHANNEL);
        let forward_logs = {
            let (events, step_id) = (events.clone(), step_id.clone());
            tokio::spawn(async move {
                while let Some(LogLine { stream, bytes }) = log_rx.recv().await {
                    events.output(&step_id, stream, bytes).await;
                }
            })
        };
        let outcome = self.executor.run_step(&run, log_tx, cancel).await;
        let _ = forward_logs.await;
        let outcome = outcome?;
        phase(
            Phase::RunFinished,
            format!(
                "step {} finished with exit code {}",
                request.action, outcome.exit_code
            ),
        );
        drop(events);
        let _ = pipe.await;
        Ok(SingleStepOutcome {
            ended: outcome.ended,
            exit_code: outcome.exit_code,
            git_sha: sha,
            image: image.image,
            image_cached: image.cached,
            result: outcome.result,
        })
    }
}
