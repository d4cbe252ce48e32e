//! A change's state transitions, each a compare-and-set: it happens only from the state (and for the owner) it
//! expects, so a change runs at most once, a cancelled change never starts, of two concurrent retries one wins,
//! and a step's end, its patches and its children land in one transaction. The reaper's verdicts are applied in
//! the transaction that reads the leases they were decided against.
//!
//! # States as persisted
//!
//! ```text
//! change:  pending ──queue──▶ queued ──claim_environment──▶ running ──(its root step ends)──▶ success | error | cancelled
//!  (local)    ▲                  │ (cancel requested, or        │ (owner's lease ran out: reap_changes;
//!             │                  ▼  owner dead: reaped)          ▼  sources/manifest failed: finish_change)
//!             └──reset_change── error | cancelled ◀──────────────┘
//! change:  pending ──start_fleet_change (owner stays NULL)──▶ running ──(its root step ends)──▶ …
//!  (fleet)    └── request_cancel while pending: reaped `cancelled`
//!
//! step:    pending ──(its turn: advance / resume)──▶ ready ──claim_step (worker, claim token)──▶ running
//!            running ──settle_step (leaf, with the token)──▶ success
//!            running ──settle_step (children recorded)──▶ running, no claim, until its children end (advance)
//!            running ──end_step (with the token) / lost worker──▶ error | cancelled
//!            running ──lost worker, retry_on_worker_loss (≤ 3 times)──▶ ready
//!            ready   ──request_cancel──▶ cancelled;   pending ──(an earlier sibling failed)──▶ aborted | cancelled
//! ```
//!
//! The tree moves on inside the transaction that records a step's end ([`advance`](super::advance), a pure
//! function of the stored tree): the next steps become `ready`, parents end, and the root's end is the change's,
//! freeing its environment. No process walks the tree; any worker may claim any ready step of a fleet change, and
//! a local run (`change create` without `--enqueue`) claims only its own change's steps.
//!
//! The rules the database itself holds, whichever process or host writes: at most one `running` change per
//! environment (a partial unique index; claims are also made in creation order, under the environment row's lock);
//! a step's end lands only with the claim token it was claimed with (a worker whose step was reaped or re-queued
//! writes nothing of it), and a change's own transitions name the owner that must hold it (`owner = ?`), so a
//! runner or worker whose lease expired by the database's clock writes nothing more — its lease is not renewed
//! once expired; change-scoped transactions lock the change's row, so parallel siblings' ends serialise per change;
//! each change numbers its own events and log lines (`changes.last_seq`).
//!
//! What comes next fits as more states, not a redesign: a change or step that waits for a person (an approval, a
//! wait step's manual continue) or a time (a scheduled change) is one more non-final state that nobody holds —
//! like `pending` and `ready` — left by a compare-and-set like the others (an approval moves a waiting step to
//! `ready`; a scheduler moves a scheduled change to `pending` at its time); and the executor that runs a step's
//! container (Docker today, Kubernetes later) stands behind the orchestrator's `Executor` seam of the worker that
//! claims the step, so none of these transitions knows which one ran it.

use super::db::{query, Tx};

use super::changes::{change_row, step_row, CHANGE_SELECT};
use super::{now, Change, Step, Store, StoreError};
use crate::events::{ChangeState, Event, EventRecord, StepState};
use crate::orchestrator::lease::Lease;

/// Whether a compare-and-set transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Done,
    /// The change was not in the state (or not held by the owner) the transition expects; re-read it.
    Refused,
}

impl Transition {
    /// A compare-and-set `UPDATE` of one row: done if it matched that row.
    pub(super) fn of(rows_affected: u64) -> Transition {
        if rows_affected == 1 {
            Transition::Done
        } else {
            Transition::Refused
        }
    }
}

/// The answer of [`Store::claim_environment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The environment is this change's: it is now `running`.
    Claimed,
    /// Another change runs there, or one created earlier waits: try again later.
    Blocked,
    /// The change is no longer queued by this owner (cancelled, reaped, or taken over): do not run it.
    Lost,
}

/// The reaper's decision for one change whose runner died.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub state: ChangeState,
    pub reason: String,
    /// Steps to end, with their final state and reason.
    pub steps: Vec<(Step, StepState, Option<String>)>,
}

/// A change the reaper ended, and the events it recorded (for live watchers).
#[derive(Debug, Clone, PartialEq)]
pub struct ReapedChange {
    pub id: String,
    pub state: ChangeState,
    pub reason: String,
    pub events: Vec<EventRecord>,
}

pub(super) async fn insert_event(
    tx: &mut Tx,
    change_id: &str,
    event: &Event,
) -> Result<EventRecord, StoreError> {
    let (seq, attempt) = super::logs::reserve_seqs(&mut *tx, change_id, 1).await?;
    let at = now();
    query("INSERT INTO events (change_id, seq, at, event) VALUES (?, ?, ?, ?)")
        .bind(change_id)
        .bind(seq)
        .bind(&at)
        .bind(serde_json::to_string(event).expect("events serialise"))
        .execute(&mut *tx)
        .await?;
    Ok(EventRecord {
        change_id: change_id.to_owned(),
        attempt,
        seq,
        at,
        event: event.clone(),
    })
}

impl Store {
    /// `pending` → `queued`, if `owner` holds the change and no cancel was requested.
    pub async fn queue_change(&self, id: &str, owner: &str) -> Result<Transition, StoreError> {
        let done = query(
            "UPDATE changes SET state = 'queued' \
             WHERE id = ? AND owner = ? AND state = 'pending' AND cancel_requested = 0",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(Transition::of(done))
    }

    /// Takes the change's environment for `owner` if no other change runs there and none was queued before it;
    /// only a change still `queued` by `owner` and not cancelled can be claimed. Changes on one environment thus
    /// run one at a time, in the order they were created.
    pub async fn claim_environment(
        &self,
        change_id: &str,
        owner: &str,
    ) -> Result<Claim, StoreError> {
        // Claims of one environment queue on its row (PostgreSQL), not on the store-wide writer lock: workers
        // claiming different environments do not wait for each other. SQLite has the one writer lock.
        let mut tx = self.pool.row_tx().await?;
        if self.backend() == super::db::Backend::Postgres {
            query(
                "SELECT e.id FROM environments e JOIN changes c ON c.environment_id = e.id WHERE c.id = ? \
                 FOR UPDATE OF e",
            )
            .bind(change_id)
            .fetch_optional(&mut tx)
            .await?;
        }
        let mine: i64 = query(
            "SELECT COUNT(*) FROM changes WHERE id = ? AND owner = ? AND state = 'queued' AND cancel_requested = 0",
        )
        .bind(change_id)
        .bind(owner)
        .fetch_one(&mut tx)
        .await?
        .get(0);
        if mine == 0 {
            return Ok(Claim::Lost);
        }
        let blocked: i64 = query(
            "SELECT COUNT(*) FROM changes o JOIN changes c ON c.id = ? \
             WHERE o.environment_id = c.environment_id AND o.id != c.id AND ( o.state = 'running' \
               OR (o.state IN ('pending', 'queued') AND (o.created_at, o.rowid) < (c.created_at, c.rowid)))",
        )
        .bind(change_id)
        .fetch_one(&mut tx)
        .await?
        .get(0);
        if blocked > 0 {
            return Ok(Claim::Blocked);
        }
        // The unique index on running changes per environment is the last word: should any writer get past the
        // check above, the database refuses the second running change and this claim waits its turn.
        let started = query(
            "UPDATE changes SET state = 'running', started_at = COALESCE(started_at, ?) WHERE id = ?",
        )
        .bind(now())
        .bind(change_id)
        .execute(&mut tx)
        .await;
        match started {
            Err(e) if super::is_unique_violation(&e) => return Ok(Claim::Blocked),
            other => other?,
        };
        // The change's first steps (its root, or on a retry whatever did not succeed) are ready at once.
        super::claims::resume_in(&mut tx, change_id).await?;
        tx.commit().await?;
        self.moved(change_id);
        Ok(Claim::Claimed)
    }

    /// Ends a change `owner` holds: its state and reason (replaced, never kept from an earlier attempt). Refused
    /// if the change already ended (e.g. the reaper ended it) or another process holds it.
    pub async fn finish_change(
        &self,
        id: &str,
        owner: &str,
        state: ChangeState,
        reason: Option<&str>,
    ) -> Result<Transition, StoreError> {
        let mut tx = self.pool.row_tx().await?;
        super::claims::lock_change(&mut tx, self.backend(), id).await?;
        let done = query(
            "UPDATE changes SET state = ?, reason = ?, finished_at = ? \
             WHERE id = ? AND owner = ? AND state IN ('pending', 'queued', 'running')",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&mut tx)
        .await?
        .rows_affected();
        if done == 1 {
            // A change ended before its steps ran (its sources or manifest failed): their turn never came.
            query("UPDATE steps SET state = 'pending' WHERE change_id = ? AND state = 'ready'")
                .bind(id)
                .execute(&mut tx)
                .await?;
        }
        tx.commit().await?;
        self.moved(id);
        Ok(Transition::of(done))
    }

    /// Makes a change that ended in error or was cancelled `pending` again, owned by `owner` (empty: by nobody, for
    /// the fleet's workers), cancel flag cleared. Refused (the change is returned as it is) if it is not in such a state: another retry won, or it
    /// succeeded.
    pub async fn reset_change(
        &self,
        id: &str,
        owner: &str,
    ) -> Result<Result<(), Change>, StoreError> {
        // The ended attempt is archived and the next one begins in one transaction: a retry that loses the race
        // (the change is no longer in error or cancelled) writes nothing.
        let mut tx = self.write_tx().await?;
        if !super::attempts::archive_attempt(&mut tx, id).await? {
            drop(tx);
            return Ok(Err(self.change(id).await?));
        }
        query(
            "UPDATE changes SET state = 'pending', reason = NULL, owner = NULLIF(?, ''), cancel_requested = 0, \
             finished_at = NULL, attempt = attempt + 1 WHERE id = ?",
        )
        .bind(owner)
        .bind(id)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Ends the changes of runners that died. In one transaction: reads the leases, asks `decide` about every
    /// unfinished change (with its steps and those leases), and applies each verdict with its events. A runner
    /// that takes its lease meanwhile waits for this transaction, so a live runner is never judged by stale leases.
    pub async fn reap_changes<F>(&self, decide: F) -> Result<Vec<ReapedChange>, StoreError>
    where
        F: Fn(&Change, &[Step], &[Lease]) -> Option<Verdict>,
    {
        let mut tx = self.write_tx().await?;
        let leases = super::changes::read_leases(&mut tx).await?;
        let changes: Vec<Change> = query(format!(
            "{CHANGE_SELECT} WHERE c.state IN ('running', 'queued', 'pending') ORDER BY c.created_at"
        ))
        .fetch_all(&mut tx)
        .await?
        .iter()
        .map(change_row)
        .collect();
        let mut reaped = Vec::new();
        for change in changes {
            let steps: Vec<Step> = query("SELECT * FROM steps WHERE change_id = ? ORDER BY rowid")
                .bind(&change.id)
                .fetch_all(&mut tx)
                .await?
                .iter()
                .map(step_row)
                .collect();
            let Some(verdict) = decide(&change, &steps, &leases) else {
                continue;
            };
            let mut events = Vec::new();
            let at = now();
            for (step, state, reason) in &verdict.steps {
                query("UPDATE steps SET state = ?, reason = ?, finished_at = ? WHERE id = ?")
                    .bind(state.as_str())
                    .bind(reason)
                    .bind(&at)
                    .bind(&step.id)
                    .execute(&mut tx)
                    .await?;
                let event = Event::StepState {
                    step_id: step.id.clone(),
                    parent_id: step.parent_id.clone(),
                    action: step.action.clone(),
                    state: *state,
                    reason: reason.clone(),
                };
                events.push(insert_event(&mut tx, &change.id, &event).await?);
            }
            query("UPDATE changes SET state = ?, reason = ?, finished_at = ? WHERE id = ?")
                .bind(verdict.state.as_str())
                .bind(&verdict.reason)
                .bind(&at)
                .bind(&change.id)
                .execute(&mut tx)
                .await?;
            let event = Event::ChangeState {
                state: verdict.state,
                reason: Some(verdict.reason.clone()),
            };
            events.push(insert_event(&mut tx, &change.id, &event).await?);
            reaped.push(ReapedChange {
                id: change.id.clone(),
                state: verdict.state,
                reason: verdict.reason,
                events,
            });
        }
        tx.commit().await?;
        for change in &reaped {
            self.changed(&change.id);
        }
        if !reaped.is_empty() {
            self.work_changed();
        }
        Ok(reaped)
    }
}
