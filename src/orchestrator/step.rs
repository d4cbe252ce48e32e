//! One step's own work: properties, image, container, patches. Children are the tree walk's business.

use serde_json::Value;
use std::time::Instant;
use tokio::sync::mpsc;

use super::step_context::{self, StepIdentity};
use super::{patches, ImageRequest, Orchestrator, Run};
use crate::actions::{Action, RunAs};
use crate::error::{Error, Result};
use crate::events::{Event, Phase, StepState};
use crate::executor::{Ended, LogLine, StepRun};
use crate::policy::Subject;
use crate::properties::{self, Layers, SecretKind};
use crate::secrets::SecretValues;
use crate::store::{PropertiesOwner, Step, StepFinish, WrittenBy};

impl Orchestrator {
    /// The build and runner secrets a step gets, named by the project's and environment's properties and
    /// granted to `subject` by the operator's policy.
    pub(super) fn step_secrets(
        &self,
        subject: Subject<'_>,
        project: &Value,
        environment: &Value,
        whose: &str,
    ) -> Result<(SecretValues, SecretValues)> {
        let resolve = |kind: SecretKind| -> Result<SecretValues> {
            let names = self.granted_secret_names(subject, project, environment, whose, kind)?;
            Ok(self
                .app
                .secrets
                .resolve(&names, &format!("opschain.{}", kind.key()))?)
        };
        Ok((resolve(SecretKind::Build)?, resolve(SecretKind::Runner)?))
    }

    /// The secret names of `kind` the properties name, each granted to `subject` (an error before anything runs
    /// otherwise).
    pub(super) fn granted_secret_names(
        &self,
        subject: Subject<'_>,
        project: &Value,
        environment: &Value,
        whose: &str,
        kind: SecretKind,
    ) -> Result<Vec<String>> {
        let named = properties::named_secrets(project, environment, kind).map_err(|source| {
            Error::InvalidProperties {
                owner: whose.to_owned(),
                source,
            }
        })?;
        Ok(self.app.policy.secrets_for(subject, kind, named)?)
    }

    /// A step's own work: properties, image, container, patches. Children are its caller's business.
    pub(super) async fn run_own(&self, run: &Run, step: &Step, action: &Action) -> Result<Own> {
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
        // The operator's policy is checked again here: properties may have changed since the change was created.
        let subject = Subject::Change {
            project: &run.project.code,
            environment: &run.environment.code,
        };
        let secrets = self
            .app
            .policy
            .require_action(subject, action)
            .map_err(Error::from)
            .and_then(|()| {
                self.step_secrets(
                    subject,
                    &project_props.document,
                    &environment_props.document,
                    "project/environment",
                )
            });
        let (build_secrets, runner_secrets) = match secrets {
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
            base_image: run.base_image.as_deref(),
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
            .prepare_beside(
                identity,
                run.base_image.as_deref(),
                action,
                events,
                &run.cancel,
            )
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

        let resources = match self.app.policy.action_resources(subject, action) {
            Ok(resources) => resources,
            Err(e) => return fail(StepState::Error, e.to_string()).await,
        };
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
            resources: Some(resources),
        };
        Self::phase(
            events,
            step,
            Phase::RunStarted,
            format!("running step {} in a new container", step.action),
        );
        let started = Instant::now();
        let (log_tx, mut log_rx) = mpsc::channel::<LogLine>(crate::executor::LOG_CHANNEL);
        let forward = {
            let (events, step_id) = (events.clone(), step.id.clone());
            tokio::spawn(async move {
                while let Some(LogLine { stream, bytes }) = log_rx.recv().await {
                    events.output(&step_id, stream, bytes).await;
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
                    match &outcome.limit {
                        Some(limit) => format!(
                            "step {} exited with code {}: {limit}",
                            step.action, outcome.exit_code
                        ),
                        None => format!(
                            "step {} exited with code {}",
                            step.action, outcome.exit_code
                        ),
                    },
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

pub(super) enum Own {
    Failed(StepState, String),
    /// The children to run next and how.
    Succeeded((Vec<String>, RunAs)),
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
