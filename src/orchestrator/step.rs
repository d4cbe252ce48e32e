//! One step's own work: properties, image, container, patches. Children are the tree walk's business.

use serde_json::Value;
use std::time::Instant;
use tokio::sync::mpsc;

use super::children::dynamic_children;
use super::failure::{step_outcome, Stage, Stopped};
use super::step_context::{self, StepIdentity};
use super::{patches, ChangeRun, ImageRequest, Orchestrator, Run};
use crate::actions::{Action, RunAs};
use crate::error::{error_text, Error, Result};
use crate::events::{Phase, StepState};
use crate::executor::{Ended, LogLine, StepRun};
use crate::policy::Subject;
use crate::properties::{self, Layers, SecretKind};
use crate::secrets::SecretValues;
use crate::store::{
    Landed, NewStep, PropertiesOwner, PropertiesVersion, Step, StepSettle, WrittenBy,
};
use tokio_util::sync::CancellationToken;

/// Why a step's own work stopped short: its final state and reason.
pub(super) type Stop = (StepState, String);

/// A [`Stop`] and, when the step's command ran to a non-zero exit, its exit code (recorded with the step's end).
pub(super) struct StepStop {
    pub(super) stop: Stop,
    pub(super) exit_code: Option<i64>,
}

impl From<Stop> for StepStop {
    fn from(stop: Stop) -> StepStop {
        StepStop {
            stop,
            exit_code: None,
        }
    }
}

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

    /// A step's own work: properties (at the versions its claim read), image, container; what it will land.
    /// Whatever stops it is a [`StepStop`] (through [`step_outcome`]): the caller ends the step with it.
    pub(super) async fn run_own(
        &self,
        run: &Run,
        step: &Step,
        action: &Action,
        (project_version, environment_version): (i64, i64),
    ) -> std::result::Result<Settled, StepStop> {
        let store = &self.app.store;
        let read = async {
            let project = store
                .properties(&(&run.project).into(), Some(project_version))
                .await?;
            let environment = store
                .properties(&(&run.environment).into(), Some(environment_version))
                .await?;
            Ok::<_, crate::store::StoreError>((project, environment))
        };
        let props = read.await.map_err(|e| {
            StepStop::from(step_outcome(
                &step.action,
                Stopped::Error {
                    stage: Stage::Prepare,
                    error: &error_text(&e),
                },
                run.cancel.is_cancelled(),
            ))
        })?;
        self.own_work(run, step, action, &props).await
    }

    async fn own_work(
        &self,
        run: &Run,
        step: &Step,
        action: &Action,
        (project_props, environment_props): &(PropertiesVersion, PropertiesVersion),
    ) -> std::result::Result<Settled, StepStop> {
        let store = &self.app.store;
        let events = &run.events;
        let stop = |stage: Stage, error: &str| {
            step_outcome(
                &step.action,
                Stopped::Error { stage, error },
                run.cancel.is_cancelled(),
            )
        };
        let failed = |stage: Stage, e: &Error| stop(stage, &error_text(e));

        if action.run.is_none() {
            // A pure grouping action: nothing to build or run; its state follows its static children.
            return Ok(Settled {
                children: action.steps.clone(),
                strategy: action.run_as,
                exit_code: None,
                properties: None,
                patches: None,
            });
        }

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
        let (build_secrets, runner_secrets) = self
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
            })
            .map_err(|e| failed(Stage::Prepare, &e))?;
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
        super::crash_point::reached("building").await;
        let started = Instant::now();
        let request = ImageRequest {
            identity,
            properties: &view,
            build_secrets: &build_secrets,
            base_image: run.base_image.as_deref(),
        };
        let image = self
            .images
            .prepare(request, events.clone(), run.cancel.clone())
            .await
            .map_err(|e| failed(Stage::Build, &e))?;
        store
            .set_step_image(&step.id, &image.image, image.cached)
            .await
            .map_err(|e| failed(Stage::Prepare, &e.into()))?;
        let beside = self
            .prepare_beside(
                identity,
                run.base_image.as_deref(),
                action,
                events,
                &run.cancel,
            )
            .await
            .map_err(|e| failed(Stage::Beside, &e))?;
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

        let resources = self
            .app
            .policy
            .action_resources(subject, action)
            .map_err(|e| stop(Stage::Prepare, &e.to_string()))?;
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
        let outcome = outcome.map_err(|e| failed(Stage::Run, &e.into()))?;
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
        if outcome.ended != Ended::Exited || outcome.exit_code != 0 {
            let limit = outcome.limit.as_ref().map(ToString::to_string);
            return Err(StepStop {
                stop: step_outcome(
                    &step.action,
                    Stopped::Ended {
                        ended: outcome.ended,
                        exit_code: outcome.exit_code,
                        timeout: action.timeout,
                        limit: limit.as_deref(),
                    },
                    run.cancel.is_cancelled(),
                ),
                // The exit code of a command that exited; not the signal's of one that was stopped.
                exit_code: (outcome.ended == Ended::Exited).then_some(outcome.exit_code),
            });
        }
        let result = outcome.result.unwrap_or(Value::Null);
        let step_patches =
            patches::patches_from_result(&result).map_err(|e| stop(Stage::Result, &e))?;
        // Children are validated before anything of the step lands.
        let ancestors = self
            .ancestors(run, step)
            .await
            .map_err(|e| failed(Stage::Prepare, &e))?;
        let children = dynamic_children(
            &result,
            &run.manifest,
            &run.manifest_path,
            &step.action,
            &ancestors,
        )
        .map_err(|e| stop(Stage::Result, &e))?;
        let mut all = action.steps.clone();
        all.extend(children.actions);
        Ok(Settled {
            children: all,
            strategy: children.strategy.unwrap_or(action.run_as),
            exit_code: Some(outcome.exit_code),
            properties: result.pointer("/step/properties").cloned(),
            patches: Some((
                step_patches,
                project_props.version,
                environment_props.version,
            )),
        })
    }

    /// Lands a step's end, its patches (if any), its children and what follows in the tree in one transaction,
    /// with the claim the step was claimed with.
    pub(super) async fn land(
        &self,
        run: &ChangeRun,
        cancel: &CancellationToken,
        step: &Step,
        claim: &str,
        done: Settled,
    ) -> std::result::Result<Landed, Stop> {
        let store = &self.app.store;
        let failed = |e: &dyn std::error::Error| {
            step_outcome(
                &step.action,
                Stopped::Error {
                    stage: Stage::Patches,
                    error: &error_text(e),
                },
                cancel.is_cancelled(),
            )
        };
        let ids: Vec<NewStep> = done
            .children
            .iter()
            .map(|a| NewStep::of(a, &run.manifest))
            .collect();
        let settle = StepSettle {
            change_id: &run.change.id,
            step_id: &step.id,
            claim,
            exit_code: done.exit_code,
            properties: done.properties,
            children: (!ids.is_empty()).then(|| (strategy_text(done.strategy), ids.as_slice())),
        };
        let by = WrittenBy::Change {
            change_id: run.change.id.clone(),
            step_id: step.id.clone(),
        };
        let landed = match &done.patches {
            Some((step_patches, project_version, environment_version)) => {
                // The drill's point is a step whose patches are about to land (not a grouping step's end).
                super::crash_point::reached("applying-patches").await;
                let project: PropertiesOwner = (&run.project).into();
                let environment: PropertiesOwner = (&run.environment).into();
                patches::apply_step_patches(
                    store,
                    (&project, *project_version),
                    (&environment, *environment_version),
                    step_patches,
                    &by,
                    Some(&settle),
                )
                .await
                .map_err(|e| failed(&e))?
            }
            None => store
                .settle_step(&settle, &[], &by)
                .await
                .map_err(|e| failed(&e))?,
        };
        Ok(landed)
    }

    /// The actions above `step`, from the change's root down to its parent.
    async fn ancestors(&self, run: &Run, step: &Step) -> Result<Vec<String>> {
        let steps = self.app.store.steps(&run.change.id).await?;
        let mut chain = vec![];
        let mut parent = step.parent_id.clone();
        while let Some(id) = parent {
            let Some(above) = steps.iter().find(|s| s.id == id) else {
                break;
            };
            chain.push(above.action.clone());
            parent = above.parent_id.clone();
        }
        chain.reverse();
        Ok(chain)
    }
}

/// What a step whose own work succeeded lands.
pub(super) struct Settled {
    children: Vec<String>,
    strategy: RunAs,
    exit_code: Option<i64>,
    properties: Option<Value>,
    /// The patches and the property versions the step started from.
    patches: Option<(patches::StepPatches, i64, i64)>,
}

pub(super) fn strategy_text(strategy: RunAs) -> &'static str {
    match strategy {
        RunAs::Sequential => "sequential",
        RunAs::Parallel => "parallel",
    }
}
