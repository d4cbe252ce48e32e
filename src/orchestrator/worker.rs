//! A worker of the fleet: starts the changes nobody holds (created with `--enqueue`, from any host) whose turn it
//! is on their environment, and claims ready steps of any such change — so the steps of one change spread over the
//! workers — running each with this host's BuildKit and Docker exactly as a local change's steps run, while its
//! lease stays alive on the store's clock. Between claims it reaps: steps of workers that were lost end `error`
//! naming the lost worker (or go back to `ready` where the action opts in with `retry_on_worker_loss`), changes of
//! runner processes that died end as [`verdict`](super::verdict) says, and what dead runners of this data directory
//! left in this host's Docker goes (containers are labelled with their data directory's store id: a dead worker's
//! containers are removed when a runner on its data directory starts again, as after any crash).

use std::collections::HashMap;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::step::StepStop;
use super::steps::Context;
use super::Orchestrator;
use crate::error::{error_text, Result};
use crate::events::StepState;
use crate::store::{ClaimScope, ClaimedStep};

/// How often a worker looks for dead workers (their steps and changes, and what they left in this host's Docker).
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How a worker works.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Steps run at once (of any changes).
    pub parallel: usize,
    /// How often an idle worker looks for work and for dead workers (a store notification wakes it sooner).
    pub poll: Duration,
    /// After `stop`, how long running steps may take to finish before they are cancelled.
    pub grace: Duration,
}

impl Orchestrator {
    /// Starts fleet changes and claims and runs their steps until `stop` is cancelled; then claims nothing more,
    /// gives running steps `grace` to end, cancels those still running and waits for them (their containers gone).
    /// The caller holds the lease (see [`hold_lease`](Self::hold_lease)) for as long as this runs.
    pub async fn work(&self, settings: &WorkerSettings, stop: CancellationToken) -> Result<()> {
        let store = self.app.store.clone();
        let mut running: JoinSet<String> = JoinSet::new();
        let mut contexts: HashMap<String, Context> = HashMap::new();
        let mut busy: HashMap<String, usize> = HashMap::new();
        let cancel_all = CancellationToken::new();
        let mut signal = store.work_signal().await;
        let mut reaped_at: Option<std::time::Instant> = None;
        loop {
            // A worker whose Docker does not answer takes nothing (another worker may run it) and leaves reaping
            // to the workers that can also remove what the dead left.
            let docker_up = self.executor.available().await.is_ok();
            if docker_up && reaped_at.is_none_or(|at| at.elapsed() >= REAP_EVERY) {
                // Reaping is idempotent: a stop does not wait for it (the store may be what is failing).
                tokio::select! {
                    reaped = self.reap() => if let Err(e) = reaped {
                        tracing::warn!(error = %e, "reaping the steps and changes of dead workers failed");
                    },
                    _ = stop.cancelled() => {}
                }
                reaped_at = Some(std::time::Instant::now());
                // Contexts of changes that ended (on other workers too) are dropped.
                let idle: Vec<String> = contexts
                    .keys()
                    .filter(|id| busy.get(*id).copied().unwrap_or(0) == 0)
                    .cloned()
                    .collect();
                for id in idle {
                    if store.change(&id).await.map_or(true, |c| c.state.is_final()) {
                        contexts.remove(&id);
                    }
                }
            }
            if docker_up && !stop.is_cancelled() {
                loop {
                    match store.start_fleet_change().await {
                        Ok(Some(started)) => {
                            tracing::info!(change_id = %started.id, worker = %self.owner, "started a fleet change");
                            for record in started.events {
                                let _ = self.live.send(record);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "starting a change from the store's queue failed");
                            break;
                        }
                    }
                }
            }
            while docker_up && running.len() < settings.parallel.max(1) && !stop.is_cancelled() {
                let claimed = match store.claim_step(&self.owner, ClaimScope::Any).await {
                    Ok(Some(claimed)) => claimed,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "looking for work in the store failed");
                        break;
                    }
                };
                let id = claimed.step.change_id.clone();
                tracing::info!(change_id = %id, step_id = %claimed.step.id, worker = %self.owner, "claimed a step");
                if !contexts.contains_key(&id) {
                    match self.fleet_context(&id, &cancel_all).await {
                        Ok(context) => {
                            contexts.insert(id.clone(), context);
                        }
                        Err(e) => {
                            self.fail_claimed(claimed, &e).await;
                            continue;
                        }
                    }
                }
                let context = &contexts[&id];
                *busy.entry(id).or_default() += 1;
                let (me, run, cancel) = (self.clone(), context.run.clone(), context.cancel.clone());
                running.spawn(async move { me.run_claimed(run, cancel, claimed).await });
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.lease_lost.cancelled() => {
                    // Others may already be re-running this worker's steps: stop them now (their containers go);
                    // their claims are void, so nothing of them lands.
                    cancel_all.cancel();
                    break;
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Ok(id) = done {
                        if let Some(n) = busy.get_mut(&id) {
                            *n = n.saturating_sub(1);
                        }
                    }
                }
                _ = signal.wait_at_most(settings.poll) => {}
            }
        }
        let drained = tokio::time::timeout(settings.grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over; cancelling the steps still running");
            cancel_all.cancel();
            while running.join_next().await.is_some() {}
        }
        Ok(())
    }

    async fn fleet_context(&self, id: &str, cancel_all: &CancellationToken) -> Result<Context> {
        let change = self.app.store.change(id).await?;
        let run = self.change_run(change).await?;
        Ok(self.context(run, cancel_all.child_token()))
    }

    /// Ends a claimed step whose change this worker could not prepare (its sources, manifest or base image).
    async fn fail_claimed(&self, claimed: ClaimedStep, e: &crate::error::Error) {
        for record in claimed.events.iter().cloned() {
            let _ = self.live.send(record);
        }
        let stop = StepStop::from((StepState::Error, error_text(e)));
        let masker = match self.masker() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "reading the secrets to mask failed");
                return;
            }
        };
        match self
            .end_claimed(
                &claimed.step.change_id,
                &claimed.step,
                &claimed.claim,
                stop,
                &masker,
            )
            .await
        {
            Ok(landed) => {
                for record in landed.events {
                    let _ = self.live.send(record);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ending a step that could not start failed"),
        }
    }
}
