//! The reaper: ends the changes of runner processes that died and removes what they left behind (containers,
//! networks, volumes). "Dead" is decided against the leases read in the transaction that ends the change, so a
//! runner that starts meanwhile is never mistaken for a dead one. Ending changes needs only the store, so `change
//! show`, `list` and `cancel` tell the truth without a Docker daemon.

use std::collections::HashMap;

use super::{lease, Orchestrator};
use crate::error::Result;
use crate::events::{ChangeState, StepState};
use crate::store::{Change, ReapedChange, Step, Store, Verdict};

/// What the reaper found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Containers, networks and volumes removed.
    pub containers: usize,
    /// The changes it ended.
    pub changes: Vec<String>,
}

/// Ends every unfinished change whose owner is dead (all but `this_owner`'s), with a reason and events.
pub async fn reap_changes(store: &Store, this_owner: Option<&str>) -> Result<Vec<ReapedChange>> {
    // Expiries are judged by the store's clock, which set them.
    let (host, now) = (lease::hostname(), store.clock_ms().await?);
    Ok(store
        .reap_changes(|change, steps, leases| {
            // A fleet change has no owner to die: waiting, only a cancel ends it; running, its steps' workers are
            // judged one by one (see `reap_lost_steps`).
            if change.owner.is_none()
                && (change.state == ChangeState::Running
                    || (change.state == ChangeState::Pending && !change.cancel_requested))
            {
                return None;
            }
            let owner = change.owner.as_deref().unwrap_or("none");
            if Some(owner) == this_owner || !lease::owner_is_dead(owner, leases, &host, now) {
                return None;
            }
            Some(verdict(change, steps))
        })
        .await?)
}

/// How a change whose runner died ends. Pure. A requested cancel ends it `cancelled`; a change that never started
/// ends `error`; a running one ends as its steps say: a step whose own work succeeded and whose children all
/// succeeded is a success (the runner died after the fact), a step left running failed, one left pending aborted.
pub fn verdict(change: &Change, steps: &[Step]) -> Verdict {
    let owner = change.owner.as_deref().unwrap_or("none");
    let died = format!("the runner process running this change ({owner}) died");
    let mut children: HashMap<&str, Vec<&Step>> = HashMap::new();
    for step in steps {
        if let Some(parent) = &step.parent_id {
            children.entry(parent).or_default().push(step);
        }
    }
    let mut ended = Vec::new();
    let root = steps.iter().find(|s| s.parent_id.is_none());
    let root_state =
        root.map(|root| settle(root, &children, change.cancel_requested, &died, &mut ended));
    let (state, reason) = match (change.state, root_state) {
        _ if change.cancel_requested && change.owner.is_none() => (
            ChangeState::Cancelled,
            "cancelled while it waited for a worker".to_owned(),
        ),
        _ if change.cancel_requested => (
            ChangeState::Cancelled,
            format!("cancelled; {died} before the cancel completed, and its steps were stopped and removed"),
        ),
        (ChangeState::Pending | ChangeState::Queued, _) => (
            ChangeState::Error,
            format!("{died} before the change started; retry it with `runner change retry {}`", change.id),
        ),
        (_, Some(StepState::Success)) => (
            ChangeState::Success,
            format!("every step had succeeded when {died}"),
        ),
        _ => (
            ChangeState::Error,
            format!("{died}; its steps were stopped and removed"),
        ),
    };
    Verdict {
        state,
        reason,
        steps: ended,
    }
}

/// The final state of `step` after its runner died, recording in `ended` every step whose stored state changes.
fn settle<'a>(
    step: &'a Step,
    children: &HashMap<&str, Vec<&'a Step>>,
    cancelled: bool,
    died: &str,
    ended: &mut Vec<(Step, StepState, Option<String>)>,
) -> StepState {
    let state = if step.children_strategy.is_some() {
        // Its own work landed; it ends as its children do.
        let below: Vec<StepState> = children
            .get(step.id.as_str())
            .into_iter()
            .flatten()
            .map(|child| settle(child, children, cancelled, died, ended))
            .collect();
        if below.iter().all(|s| *s == StepState::Success) {
            StepState::Success
        } else if cancelled {
            StepState::Cancelled
        } else {
            StepState::Error
        }
    } else if step.state.is_final() {
        step.state
    } else if cancelled {
        StepState::Cancelled
    } else if step.state == StepState::Running {
        StepState::Error
    } else {
        StepState::Aborted
    };
    if state != step.state || !step.state.is_final() {
        let reason = (state != StepState::Success).then(|| died.to_owned());
        ended.push((step.clone(), state, reason));
    }
    state
}

impl Orchestrator {
    /// Ends the changes of runners that died, then removes their containers, networks and volumes. Never touches
    /// what a live runner owns.
    pub async fn reap(&self) -> Result<Reaped> {
        let store = &self.app.store;
        let mut reaped = Reaped::default();
        // Steps of fleet changes whose worker was lost: judged by that worker's lease on the store's clock (or,
        // on this host, by its pid).
        let (host, now) = (lease::hostname(), store.clock_ms().await?);
        let lost = store
            .reap_lost_steps(|step, leases| {
                let worker = step.worker.as_deref()?;
                if worker == self.owner || !lease::owner_is_dead(worker, leases, &host, now) {
                    return None;
                }
                let seen_by = format!("seen by worker {} on host {host}", self.owner);
                Some(match leases.iter().find(|l| l.owner == worker) {
                    Some(l) => format!(
                        "worker {worker} on host {} was lost while running this step: its lease expired or its process is gone ({seen_by})",
                        l.host
                    ),
                    None => format!("worker {worker} was lost while running this step: it holds no lease ({seen_by})"),
                })
            })
            .await?;
        for record in lost {
            tracing::warn!(change_id = %record.change_id, event = ?record.event, "a step's worker was lost");
            let _ = self.live.send(record);
        }
        for change in reap_changes(store, Some(&self.owner)).await? {
            tracing::warn!(change_id = %change.id, state = %change.state, reason = %change.reason, "reaped a change whose runner died");
            for record in change.events {
                let _ = self.live.send(record);
            }
            reaped.changes.push(change.id);
        }
        let mut left_overs = self.executor.left_overs().await?;
        // Leases are read after listing: an owner alive when its container was listed still holds its lease now.
        let leases = store.leases().await?;
        let (host, now) = (lease::hostname(), store.clock_ms().await?);
        let dead =
            |owner: &str| owner != self.owner && lease::owner_is_dead(owner, &leases, &host, now);
        // Containers first: a network or volume in use cannot go.
        left_overs.sort_by_key(|l| l.kind != crate::executor::LeftOverKind::Container);
        for left in left_overs {
            if left.store == store.id() && dead(&left.owner) {
                tracing::warn!(kind = ?left.kind, owner = %left.owner, "removing what a dead runner left");
                self.executor.remove(&left).await?;
                reaped.containers += 1;
            }
        }
        for l in leases.iter().filter(|l| dead(&l.owner)) {
            store.drop_lease(&l.owner).await?;
        }
        Ok(reaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(state: ChangeState, cancel_requested: bool) -> Change {
        Change {
            id: "c".into(),
            project: "p".into(),
            environment: "e".into(),
            action: "root".into(),
            git_rev: "main".into(),
            git_sha: "abc".into(),
            state,
            reason: None,
            owner: Some("dead".into()),
            cancel_requested,
            created_at: "t".into(),
            started_at: None,
            finished_at: None,
            attempt: 1,
        }
    }

    fn step(id: &str, parent: Option<&str>, state: StepState, strategy: Option<&str>) -> Step {
        Step {
            id: id.into(),
            change_id: "c".into(),
            parent_id: parent.map(str::to_owned),
            position: 0,
            action: id.into(),
            state,
            reason: None,
            exit_code: None,
            image_id: None,
            image_cached: None,
            properties: None,
            project_version: None,
            environment_version: None,
            children_strategy: strategy.map(str::to_owned),
            started_at: None,
            finished_at: None,
            attempt: 1,
            worker: None,
            ignore_failure: false,
            retry_on_worker_loss: false,
        }
    }

    #[test]
    fn a_change_whose_steps_all_succeeded_ends_success_not_error() {
        // The runner died after its last step landed, before it ended the parent and the change.
        let steps = [
            step("root", None, StepState::Running, Some("sequential")),
            step("a", Some("root"), StepState::Success, None),
            step("b", Some("root"), StepState::Success, None),
        ];
        let verdict = verdict(&change(ChangeState::Running, false), &steps);
        assert_eq!(verdict.state, ChangeState::Success, "{}", verdict.reason);
        assert_eq!(verdict.steps.len(), 1);
        assert_eq!(verdict.steps[0].1, StepState::Success);
    }

    #[test]
    fn a_step_left_running_fails_and_pending_ones_abort() {
        let steps = [
            step("root", None, StepState::Running, Some("sequential")),
            step("a", Some("root"), StepState::Running, None),
            step("b", Some("root"), StepState::Pending, None),
        ];
        let verdict = verdict(&change(ChangeState::Running, false), &steps);
        assert_eq!(verdict.state, ChangeState::Error);
        let states: Vec<_> = verdict
            .steps
            .iter()
            .map(|(s, st, _)| (s.id.as_str(), *st))
            .collect();
        assert_eq!(
            states,
            [
                ("a", StepState::Error),
                ("b", StepState::Aborted),
                ("root", StepState::Error)
            ]
        );
        assert!(verdict.reason.contains("(dead) died"));
    }

    #[test]
    fn a_requested_cancel_ends_cancelled_even_after_the_runner_died() {
        let steps = [step("root", None, StepState::Running, None)];
        let verdict = verdict(&change(ChangeState::Running, true), &steps);
        assert_eq!(verdict.state, ChangeState::Cancelled);
        assert_eq!(verdict.steps[0].1, StepState::Cancelled);
    }
}
