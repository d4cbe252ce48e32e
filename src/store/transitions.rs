//! A change's state transitions, each a compare-and-set: it happens only from the state (and for the owner) it
//! expects, so a change runs at most once, a cancelled change never starts, of two concurrent retries one wins,
//! and a step's end, its patches and its children land in one transaction. The reaper's verdicts are applied in
//! the transaction that reads the leases they were decided against.
//!
//! # States as persisted
//!
//! ```text
//! change:  pending ──queue──▶ queued ──claim_environment──▶ running ──finish_change──▶ success | error | cancelled
//!             ▲                  │ (cancel requested, or        │ (owner's lease ran out: reap_changes)
//!             │                  ▼  owner dead: reaped)          ▼
//!             └──reset_change── error | cancelled ◀──────────────┘
//!
//! step:    pending ──start_step──▶ running ──settle_step (leaf)──▶ success
//!                                     │ └──settle_step (children recorded; runs until they end)
//!                                     └──finish_step / reaper──▶ error | cancelled | aborted
//! ```
//!
//! The rules the database itself holds, whichever process or host writes: at most one `running` change per
//! environment (a partial unique index; claims are also made in creation order, under the environment row's lock);
//! every write to a change or its steps names the owner that must hold it (`owner = ?` in the same statement), so
//! a runner whose change was reaped — its lease expired by the database's clock — writes nothing more; each
//! change numbers its own events and log lines (`changes.last_seq`).
//!
//! What comes next fits as more states and more owners, not a redesign: a change or step that waits for a person
//! (approval, a wait step's manual continue) or a time (a scheduled change) is one more non-final state between
//! `queued`/`pending` and `running` that no owner holds, left by a compare-and-set like the others; a step taken
//! by a worker of a fleet rather than by the change's own process is the same `start_step` guarded by the
//! worker's lease instead of the change owner's; and the executor that runs a step's container (Docker today,
//! Kubernetes later) is behind the orchestrator's `Executor` seam, so none of these transitions knows which one ran
//! it.

use super::db::{query, Tx};

use super::changes::{change_row, step_row, CHANGE_SELECT};
use super::{now, Change, PropertiesWrite, Step, Store, StoreError, WrittenBy};
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
    fn of(rows_affected: u64) -> Transition {
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

/// How a step whose own work succeeded is settled: together with its patches, in one transaction.
#[derive(Debug, Clone)]
pub struct StepSettle<'a> {
    pub change_id: &'a str,
    pub step_id: &'a str,
    /// The runner process that runs the change; nothing lands if it no longer owns it.
    pub owner: &'a str,
    pub exit_code: Option<i64>,
    pub properties: Option<serde_json::Value>,
    /// `sequential` or `parallel`, and the children (new step id, action) to record; none for a leaf.
    pub children: Option<(&'a str, &'a [super::NewStep])>,
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
        tx.commit().await?;
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
        let done = query(
            "UPDATE changes SET state = ?, reason = ?, finished_at = ? \
             WHERE id = ? AND owner = ? AND state IN ('pending', 'queued', 'running')",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.work_changed();
        Ok(Transition::of(done))
    }

    /// Makes a change that ended in error or was cancelled `pending` again, owned by `owner`, cancel flag
    /// cleared. Refused (the change is returned as it is) if it is not in such a state: another retry won, or it
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
            "UPDATE changes SET state = 'pending', reason = NULL, owner = ?, cancel_requested = 0, \
             finished_at = NULL, attempt = attempt + 1 WHERE id = ?",
        )
        .bind(owner)
        .bind(id)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Marks a step running with the property versions it starts from, if its change is still `running` for
    /// `owner`.
    pub async fn start_step(
        &self,
        id: &str,
        owner: &str,
        project_version: i64,
        environment_version: i64,
    ) -> Result<Transition, StoreError> {
        let done = query(
            "UPDATE steps SET state = 'running', started_at = ?, project_version = ?, environment_version = ?, \
             reason = NULL, exit_code = NULL, finished_at = NULL, \
             attempt = (SELECT c.attempt FROM changes c WHERE c.id = steps.change_id) \
             WHERE id = ? AND state != 'success' AND EXISTS \
             (SELECT 1 FROM changes c WHERE c.id = steps.change_id AND c.owner = ? AND c.state = 'running')",
        )
        .bind(now())
        .bind(project_version)
        .bind(environment_version)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(Transition::of(done))
    }

    /// Settles a step whose own work succeeded: its property writes, its end (success) and its children land in
    /// one transaction, or nothing does. Refused (nothing written) if the step is no longer running under a change
    /// `owner` runs, so a reaped step's patch is never applied and a retry never applies a patch twice.
    /// A write whose base version moved on fails with [`StoreError::VersionConflict`].
    pub async fn settle_step(
        &self,
        settle: &StepSettle<'_>,
        writes: &[PropertiesWrite<'_>],
        by: &WrittenBy,
    ) -> Result<Transition, StoreError> {
        let mut tx = self.write_tx().await?;
        let live: i64 = query(
            "SELECT COUNT(*) FROM steps s JOIN changes c ON c.id = s.change_id \
             WHERE s.id = ? AND s.state = 'running' AND c.id = ? AND c.owner = ? AND c.state = 'running'",
        )
        .bind(settle.step_id)
        .bind(settle.change_id)
        .bind(settle.owner)
        .fetch_one(&mut tx)
        .await?
        .get(0);
        if live == 0 {
            return Ok(Transition::Refused);
        }
        super::properties::write_in(&mut tx, writes, by).await?;
        query(
            "UPDATE steps SET state = CASE WHEN ? = 1 THEN 'success' ELSE state END, exit_code = ?, reason = NULL, \
             properties = ?, finished_at = ? WHERE id = ?",
        )
        // A step with children stays running until they end; `children_strategy` says its own work is done.
        .bind(settle.children.is_none())
        .bind(settle.exit_code)
        .bind(settle.properties.as_ref().map(|p| p.to_string()))
        .bind(now())
        .bind(settle.step_id)
        .execute(&mut tx)
        .await?;
        if let Some((strategy, children)) = settle.children {
            super::changes::replace_children(
                &mut tx,
                settle.change_id,
                settle.step_id,
                strategy,
                children,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Transition::Done)
    }

    /// Ends the changes of runners that died. In one transaction: reads the leases, asks `decide` about every
    /// unfinished change (with its steps and those leases), and applies each verdict with its events. A runner
    /// that takes its lease meanwhile waits for this transaction, so a live runner is never judged by stale leases.
    pub async fn reap_changes<F>(&self, decide: F) -> Result<Vec<ReapedChange>, StoreError>
    where
        F: Fn(&Change, &[Step], &[Lease]) -> Option<Verdict>,
    {
        let mut tx = self.write_tx().await?;
        let leases: Vec<Lease> = query("SELECT owner, host, pid, expires_at FROM leases")
            .fetch_all(&mut tx)
            .await?
            .iter()
            .map(|r| Lease {
                owner: r.get(0),
                host: r.get(1),
                pid: r.get(2),
                expires_at: r.get(3),
            })
            .collect();
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
