//! Running claimed steps. A process (a local run of its own change, or a fleet worker) claims ready steps from the
//! store, runs each one's own work with [`step`](super::step)'s code, and lands its end with the claim token; the
//! store advances the tree in that transaction, so no process walks the tree in memory and the steps of one change
//! may run on different workers. What a change's steps share (sources at its commit, manifest, repository
//! properties, base image) is read once per change and process, and dropped when the change ends.

use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::step::{Settled, StepStop};
use super::{ChangeRun, Orchestrator, Run};
use crate::error::{error_text, Result};
use crate::events::{Event, StepState};
use crate::mask::Masker;
use crate::store::{Change, ClaimedStep, Landed, Step, StepEnd, Transition};

/// A change this process runs steps of: what they share, and what cancels them (the process's own stop, or the
/// change's cancel flag set from anywhere).
pub(super) struct Context {
    pub(super) run: Arc<ChangeRun>,
    pub(super) cancel: CancellationToken,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Context {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl Orchestrator {
    /// Reads what the steps of `change` share: its sources at its commit, its manifest, the repository's
    /// properties and the base image (checked against the operator's policy).
    pub(super) async fn change_run(&self, change: Change) -> Result<ChangeRun> {
        let store = &self.app.store;
        let project = store.project(&change.project).await?;
        let environment = store
            .environment(&change.project, &change.environment)
            .await?;
        super::crash_point::reached("cloning").await;
        self.sources.have_commit(&project, &change.git_sha).await?;
        let (manifest, manifest_path) = self.manifest(&project, &change.git_sha).await?;
        let repository_properties = self
            .sources
            .repository_properties(&project, &change.git_sha, &environment.code)
            .await?;
        let base_image = store
            .base_image_for(&project.code, &environment.code)
            .await?
            .image;
        if let Some(image) = &base_image {
            // Project admins choose among the images the operator allows; the operator's default needs no grant.
            self.app.policy.require(
                &project.code,
                &environment.code,
                crate::policy::Feature::BaseImage(image.clone()),
            )?;
        }
        Ok(ChangeRun {
            change,
            project,
            environment,
            manifest,
            manifest_path,
            repository_properties,
            base_image,
            masker: self.masker()?,
        })
    }

    /// The context of a change's steps in this process; `cancel` stops them, and so does the change's cancel flag.
    pub(super) fn context(&self, run: ChangeRun, cancel: CancellationToken) -> Context {
        let watch = self.watch_cancel(&run.change.id, cancel.clone());
        Context {
            run: Arc::new(run),
            cancel,
            watch,
        }
    }

    /// Runs a claimed step's own work and lands its end (with its output stored first); returns its change's id.
    /// Never leaves the step `running` while this process lives: whatever stops it ends it.
    pub(super) async fn run_claimed(
        &self,
        run: Arc<ChangeRun>,
        cancel: CancellationToken,
        claimed: ClaimedStep,
    ) -> String {
        let ClaimedStep {
            step,
            claim,
            project_version,
            environment_version,
            events,
        } = claimed;
        for record in events {
            let _ = self.live.send(record);
        }
        let change_id = step.change_id.clone();
        let span = tracing::info_span!("step", change_id = %change_id, step_id = %step.id, action = %step.action);
        let landed = self
            .run_and_land(
                run,
                cancel,
                &step,
                &claim,
                (project_version, environment_version),
            )
            .instrument(span)
            .await;
        match landed {
            Ok(landed) => {
                if landed.transition == Transition::Refused {
                    tracing::warn!(change_id = %change_id, step_id = %step.id, "the step was no longer this worker's (reaped, re-queued or cancelled); nothing of it landed");
                }
                let change_ended = landed
                    .events
                    .iter()
                    .any(|r| matches!(r.event, Event::ChangeState { .. }));
                for record in landed.events {
                    let _ = self.live.send(record);
                }
                if landed.transition == Transition::Done && !change_ended {
                    super::crash_point::reached("between-steps").await;
                }
            }
            Err(e) => {
                tracing::warn!(change_id = %change_id, step_id = %step.id, error = %e, "the step's end could not be stored")
            }
        }
        change_id
    }

    async fn run_and_land(
        &self,
        run: Arc<ChangeRun>,
        cancel: CancellationToken,
        step: &Step,
        claim: &str,
        versions: (i64, i64),
    ) -> Result<Landed> {
        let (events, recorder) = self.recorder(&run.change.id, run.masker.clone());
        let step_run = Run {
            change_run: run.clone(),
            events,
            cancel: cancel.clone(),
        };
        let outcome: std::result::Result<Settled, StepStop> = if cancel.is_cancelled() {
            Err(StepStop::from((
                StepState::Cancelled,
                "cancelled".to_owned(),
            )))
        } else {
            match run.manifest.action(&run.manifest_path, &step.action) {
                Ok(action) => {
                    let action = action.clone();
                    self.run_own(&step_run, step, &action, versions).await
                }
                Err(e) => Err(StepStop::from((StepState::Error, error_text(&e)))),
            }
        };
        // The step's output and phases are stored before its end: nothing of a step comes after its end.
        drop(step_run);
        let _ = recorder.await;
        if self.lease_lost.is_cancelled() {
            // This worker was judged lost: whatever it has, it writes nothing more.
            return Ok(Landed::refused());
        }
        let stop = match outcome {
            Ok(settled) => match self.land(&run, &cancel, step, claim, settled).await {
                Ok(landed) => return Ok(landed),
                Err(stop) => StepStop::from(stop),
            },
            Err(stop) => stop,
        };
        self.end_claimed(&run.change.id, step, claim, stop, &run.masker)
            .await
    }

    /// Ends a claimed step that failed or was stopped (its reason masked), and moves the tree on.
    pub(super) async fn end_claimed(
        &self,
        change_id: &str,
        step: &Step,
        claim: &str,
        stop: StepStop,
        masker: &Masker,
    ) -> Result<Landed> {
        let StepStop {
            stop: (state, reason),
            exit_code,
        } = stop;
        Ok(self
            .app
            .store
            .end_step(&StepEnd {
                change_id,
                step_id: &step.id,
                claim,
                state,
                reason: masker.mask_opt(Some(reason)),
                exit_code,
            })
            .await?)
    }
}
