//! A worker of the fleet: adopts the changes nobody holds (created with `--enqueue`, from any host) whose turn it
//! is on their environment, runs each with this host's BuildKit and Docker exactly as a change created here runs,
//! and keeps its lease alive on the store's clock. Between adoptions it reaps: the changes of workers that died
//! end `error` naming the lost worker (by its lease's expiry, or at once when its pid is gone on this machine),
//! and what such a worker left in this host's Docker goes.

use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Orchestrator;
use crate::error::Result;

/// How often a worker looks for dead workers (their changes, and what they left in this host's Docker).
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How a worker works.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Changes run at once (of different environments: one environment runs one change at a time).
    pub parallel: usize,
    /// How often an idle worker looks for work and for dead workers.
    pub poll: Duration,
    /// After `stop`, how long running changes may take to finish before they are cancelled.
    pub grace: Duration,
}

impl Orchestrator {
    /// Adopts and runs changes until `stop` is cancelled; then adopts nothing more, gives running changes
    /// `grace` to end, cancels those still running and waits for them (their steps stopped, containers gone).
    /// The caller holds the lease (see [`hold_lease`](Self::hold_lease)) for as long as this runs.
    pub async fn work(&self, settings: &WorkerSettings, stop: CancellationToken) -> Result<()> {
        let store = self.app.store.clone();
        let mut running: JoinSet<()> = JoinSet::new();
        let cancel_all = CancellationToken::new();
        let mut reaped_at: Option<std::time::Instant> = None;
        loop {
            // A worker whose Docker does not answer takes nothing (another worker may run it) and leaves reaping
            // to the workers that can also remove what the dead left.
            let docker_up = self.executor.available().await.is_ok();
            if docker_up && reaped_at.is_none_or(|at| at.elapsed() >= REAP_EVERY) {
                // Reaping is idempotent: a stop does not wait for it (the store may be what is failing).
                tokio::select! {
                    reaped = self.reap() => if let Err(e) = reaped {
                        tracing::warn!(error = %e, "reaping the changes of dead workers failed");
                    },
                    _ = stop.cancelled() => {}
                }
                reaped_at = Some(std::time::Instant::now());
            }
            while docker_up && running.len() < settings.parallel.max(1) && !stop.is_cancelled() {
                match store.adopt_change(&self.owner).await {
                    Ok(Some(id)) => {
                        tracing::info!(change_id = %id, worker = %self.owner, "adopted a change");
                        let (me, cancel) = (self.clone(), cancel_all.child_token());
                        running.spawn(async move {
                            if let Err(e) = me.run_change(&id, cancel).await {
                                tracing::warn!(change_id = %id, error = %e, "the change did not run");
                            }
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "looking for work in the store failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(settings.poll) => {}
            }
        }
        let drained = tokio::time::timeout(settings.grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over; cancelling the changes still running");
            cancel_all.cancel();
            while running.join_next().await.is_some() {}
        }
        Ok(())
    }
}
