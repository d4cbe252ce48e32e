//! The reaper: removes what runners that died left behind (containers, networks, volumes) and ends their changes.

use super::{lease, Orchestrator};
use crate::error::Result;
use crate::events::{ChangeState, Event, Masker, StepState};
use crate::store::StepFinish;

/// What the reaper found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    pub containers: usize,
    pub changes: Vec<String>,
}

impl Orchestrator {
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
}
