//! Steps claimed by workers, and the tree moving on in the transaction that records a step's end.
//!
//! A `ready` step is claimed by one worker at a time (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so concurrent
//! claimers pass over each other's candidates; the one writer lock on SQLite): it becomes `running` with the
//! worker's id and a fresh claim token, the fencing token every later write about the step must carry. A step's
//! end — success with its patches and children, or a failure — lands only with that token, together with what
//! [`advance`](super::advance) makes of it: the next steps ready, parents ended, the change ended and its
//! environment free. Change-scoped transactions lock the change's row first, so the settles of parallel
//! siblings serialise per change (and only per change: no store-wide lock unless properties are written).

use super::advance::{self, Node, Strategy, Update};
use super::db::{query, Backend, Tx};
use super::transitions::{insert_event, Transition};
use super::{now, NewStep, PropertiesWrite, Step, Store, StoreError, WrittenBy};
use crate::events::{Event, EventRecord, StepState};

/// A step a worker claimed.
#[derive(Debug, Clone)]
pub struct ClaimedStep {
    pub step: Step,
    /// The fencing token: the step's end lands only with it.
    pub claim: String,
    /// The property versions the step starts from (read in the claiming transaction).
    pub project_version: i64,
    pub environment_version: i64,
    /// What the claim recorded (the step's `running` event), for live watchers.
    pub events: Vec<EventRecord>,
}

/// How a step whose own work succeeded is settled: together with its patches, in one transaction.
#[derive(Debug, Clone)]
pub struct StepSettle<'a> {
    pub change_id: &'a str,
    pub step_id: &'a str,
    /// The claim token the step was claimed with; nothing lands if the step no longer holds it.
    pub claim: &'a str,
    pub exit_code: Option<i64>,
    pub properties: Option<serde_json::Value>,
    /// `sequential` or `parallel`, and the children to record; none for a leaf.
    pub children: Option<(&'a str, &'a [NewStep])>,
}

/// How a step that failed (or was stopped) ends.
#[derive(Debug, Clone)]
pub struct StepEnd<'a> {
    pub change_id: &'a str,
    pub step_id: &'a str,
    pub claim: &'a str,
    /// A final state other than success.
    pub state: StepState,
    /// Masked by the caller: it is stored and shown as is.
    pub reason: Option<String>,
    pub exit_code: Option<i64>,
}

/// What a transition landed: whether it happened and the events it recorded (for live watchers).
#[derive(Debug, Clone, PartialEq)]
pub struct Landed {
    pub transition: Transition,
    pub events: Vec<EventRecord>,
}

impl Landed {
    /// Nothing happened, nothing recorded.
    pub fn refused() -> Landed {
        Landed {
            transition: Transition::Refused,
            events: vec![],
        }
    }

    /// It happened, recording `events`.
    pub fn done(events: Vec<EventRecord>) -> Landed {
        Landed {
            transition: Transition::Done,
            events,
        }
    }
}

/// The changes a step claim may come from.
#[derive(Debug, Clone, Copy)]
pub enum ClaimScope<'a> {
    /// Fleet changes (no owner): any worker runs their steps.
    Any,
    /// This change only, which the claiming process owns (a local run of its own change).
    Change(&'a str),
}

impl Store {
    /// Claims the oldest ready step `worker` may run: of a `running` change not asked to cancel that is a fleet
    /// change (no owner; [`ClaimScope::Any`]) or `worker`'s own ([`ClaimScope::Change`]). `None` when there is
    /// none.
    pub async fn claim_step(
        &self,
        worker: &str,
        scope: ClaimScope<'_>,
    ) -> Result<Option<ClaimedStep>, StoreError> {
        let only = match scope {
            ClaimScope::Any => None,
            ClaimScope::Change(id) => Some(id),
        };
        let candidates = "SELECT s.id FROM steps s JOIN changes c ON c.id = s.change_id \
             WHERE s.state = 'ready' AND c.state = 'running' AND c.cancel_requested = 0 \
               AND ((? IS NULL AND c.owner IS NULL) OR (c.id = ? AND c.owner = ?)) \
             ORDER BY s.rowid LIMIT 1";
        let sql = match self.backend() {
            Backend::Postgres => format!("{candidates} FOR UPDATE OF s SKIP LOCKED"),
            Backend::Sqlite => candidates.to_owned(),
        };
        let mut tx = self.pool.row_tx().await?;
        let Some(row) = query(sql)
            .bind(only)
            .bind(only)
            .bind(worker)
            .fetch_optional(&mut tx)
            .await?
        else {
            return Ok(None);
        };
        let id: String = row.get(0);
        let claim = uuid::Uuid::new_v4().to_string();
        let version = |kind: &str, column: &str| {
            format!(
                "(SELECT COALESCE(MAX(v.version), 0) FROM property_versions v JOIN changes c ON c.id = steps.change_id \
                 WHERE v.owner_kind = '{kind}' AND v.owner_id = c.{column})"
            )
        };
        let claimed = query(format!(
            "UPDATE steps SET state = 'running', worker = ?, claim = ?, started_at = ?, reason = NULL, \
             exit_code = NULL, finished_at = NULL, project_version = {}, environment_version = {}, \
             attempt = (SELECT c.attempt FROM changes c WHERE c.id = steps.change_id) \
             WHERE id = ? AND state = 'ready'",
            version("project", "project_id"),
            version("environment", "environment_id"),
        ))
        .bind(worker)
        .bind(&claim)
        .bind(now())
        .bind(&id)
        .execute(&mut tx)
        .await?
        .rows_affected();
        if claimed != 1 {
            return Ok(None);
        }
        let step = super::changes::step_row(
            &query("SELECT * FROM steps WHERE id = ?")
                .bind(&id)
                .fetch_one(&mut tx)
                .await?,
        );
        let event = insert_event(
            &mut tx,
            &step.change_id,
            &state_event(&step, StepState::Running, None),
        )
        .await?;
        tx.commit().await?;
        self.changed(&step.change_id);
        Ok(Some(ClaimedStep {
            project_version: step.project_version.unwrap_or_default(),
            environment_version: step.environment_version.unwrap_or_default(),
            claim,
            step,
            events: vec![event],
        }))
    }

    /// Settles a step whose own work succeeded: its property writes, its end (success) or its children, and what
    /// follows in the tree land in one transaction, or nothing does. Refused (nothing written) if the step no
    /// longer holds `claim` (it was reaped or re-queued), so a lost worker's patch is never applied and no patch
    /// is applied twice. A write whose base version moved on fails with [`StoreError::VersionConflict`].
    pub async fn settle_step(
        &self,
        settle: &StepSettle<'_>,
        writes: &[PropertiesWrite<'_>],
        by: &WrittenBy,
    ) -> Result<Landed, StoreError> {
        // The change's row, then the properties' owners' rows (see `properties::write_in`): no store-wide lock.
        let mut tx = self.pool.row_tx().await?;
        let Some(step) = self
            .claimed(&mut tx, settle.change_id, settle.step_id, settle.claim)
            .await?
        else {
            return Ok(Landed::refused());
        };
        super::properties::write_in(&mut tx, writes, by).await?;
        let leaf = settle.children.is_none();
        query(
            "UPDATE steps SET state = CASE WHEN ? = 1 THEN 'success' ELSE state END, exit_code = ?, reason = NULL, \
             properties = ?, finished_at = ?, claim = NULL WHERE id = ?",
        )
        // A step with children stays running until they end; `children_strategy` says its own work is done.
        .bind(leaf)
        .bind(settle.exit_code)
        .bind(settle.properties.as_ref().map(|p| p.to_string()))
        .bind(now())
        .bind(settle.step_id)
        .execute(&mut tx)
        .await?;
        let mut events = Vec::new();
        if let Some((strategy, children)) = settle.children {
            super::changes::replace_children(
                &mut tx,
                settle.change_id,
                settle.step_id,
                strategy,
                children,
            )
            .await?;
        } else {
            let event = state_event(&step, StepState::Success, None);
            events.push(insert_event(&mut tx, settle.change_id, &event).await?);
        }
        events.extend(advance_in(&mut tx, settle.change_id, settle.step_id).await?);
        tx.commit().await?;
        self.moved(settle.change_id);
        Ok(Landed::done(events))
    }

    /// Ends a claimed step that failed or was stopped, and moves the tree on, in one transaction. Refused if the
    /// step no longer holds `claim`.
    pub async fn end_step(&self, end: &StepEnd<'_>) -> Result<Landed, StoreError> {
        let mut tx = self.pool.row_tx().await?;
        let Some(step) = self
            .claimed(&mut tx, end.change_id, end.step_id, end.claim)
            .await?
        else {
            return Ok(Landed::refused());
        };
        query(
            "UPDATE steps SET state = ?, reason = ?, exit_code = COALESCE(?, exit_code), finished_at = ?, \
             claim = NULL WHERE id = ?",
        )
        .bind(end.state.as_str())
        .bind(&end.reason)
        .bind(end.exit_code)
        .bind(now())
        .bind(end.step_id)
        .execute(&mut tx)
        .await?;
        let event = state_event(&step, end.state, end.reason.clone());
        let mut events = vec![insert_event(&mut tx, end.change_id, &event).await?];
        events.extend(advance_in(&mut tx, end.change_id, end.step_id).await?);
        tx.commit().await?;
        self.moved(end.change_id);
        Ok(Landed::done(events))
    }

    /// Whether `claim` still holds the step (running, change running); locks the change's row first (PostgreSQL)
    /// so that settles of one change's steps go one at a time.
    async fn claimed(
        &self,
        tx: &mut Tx,
        change_id: &str,
        step_id: &str,
        claim: &str,
    ) -> Result<Option<Step>, StoreError> {
        lock_change(tx, self.backend(), change_id).await?;
        Ok(query(
            "SELECT s.* FROM steps s JOIN changes c ON c.id = s.change_id \
             WHERE s.id = ? AND s.change_id = ? AND s.state = 'running' AND s.claim = ? AND c.state = 'running'",
        )
        .bind(step_id)
        .bind(change_id)
        .bind(claim)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| super::changes::step_row(&row)))
    }

    /// In-process wake-ups after a change's tree moved (PostgreSQL's triggers announce it themselves).
    pub(super) fn moved(&self, change_id: &str) {
        self.changed(change_id);
        self.work_changed();
    }
}

/// Locks the change's row for the rest of the transaction (PostgreSQL; SQLite's transaction holds the one lock).
pub(super) async fn lock_change(
    tx: &mut Tx,
    backend: Backend,
    change_id: &str,
) -> Result<(), StoreError> {
    if backend == Backend::Postgres {
        query("SELECT id FROM changes WHERE id = ? FOR UPDATE")
            .bind(change_id)
            .fetch_optional(&mut *tx)
            .await?;
    }
    Ok(())
}

pub(super) fn state_event(step: &Step, state: StepState, reason: Option<String>) -> Event {
    Event::StepState {
        step_id: step.id.clone(),
        parent_id: step.parent_id.clone(),
        action: step.action.clone(),
        state,
        reason,
    }
}

/// The change's tree as [`advance`] sees it, with each step's row.
pub(super) async fn tree(tx: &mut Tx, change_id: &str) -> Result<Vec<(Node, Step)>, StoreError> {
    Ok(
        query("SELECT * FROM steps WHERE change_id = ? ORDER BY rowid")
            .bind(change_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| {
                let step = super::changes::step_row(row);
                let node = Node {
                    id: step.id.clone(),
                    parent: step.parent_id.clone(),
                    position: step.position,
                    action: step.action.clone(),
                    state: step.state,
                    reason: step.reason.clone(),
                    strategy: step.children_strategy.as_deref().map(Strategy::parse),
                    ignore_failure: step.ignore_failure,
                };
                (node, step)
            })
            .collect(),
    )
}

/// Reads the change's tree, asks `walk` (one of [`advance`]'s pure functions) what follows, and applies it.
async fn walk_in(
    tx: &mut Tx,
    change_id: &str,
    walk: impl FnOnce(&[Node]) -> Vec<Update>,
) -> Result<Vec<EventRecord>, StoreError> {
    let tree = tree(tx, change_id).await?;
    let nodes: Vec<Node> = tree.iter().map(|(n, _)| n.clone()).collect();
    apply(tx, change_id, &tree, walk(&nodes)).await
}

/// Runs [`advance::advance`] for `changed` and applies what it says.
pub(super) async fn advance_in(
    tx: &mut Tx,
    change_id: &str,
    changed: &str,
) -> Result<Vec<EventRecord>, StoreError> {
    walk_in(tx, change_id, |nodes| advance::advance(nodes, changed)).await
}

/// Applies updates of the tree, with the events of final states; ends the change when the root ended.
pub(super) async fn apply(
    tx: &mut Tx,
    change_id: &str,
    tree: &[(Node, Step)],
    updates: Vec<Update>,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut events = Vec::new();
    let at = now();
    for update in updates {
        match update {
            Update::Step { id, state, reason } => match state {
                StepState::Ready | StepState::Pending => {
                    query(
                            "UPDATE steps SET state = ?, reason = NULL, claim = NULL, exit_code = NULL, \
                             finished_at = NULL WHERE id = ?",
                        )
                        .bind(state.as_str())
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?;
                }
                StepState::Running => {
                    query("UPDATE steps SET state = 'running', reason = NULL, finished_at = NULL WHERE id = ?")
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                }
                _ => {
                    query("UPDATE steps SET state = ?, reason = ?, finished_at = ?, claim = NULL WHERE id = ?")
                            .bind(state.as_str())
                            .bind(&reason)
                            .bind(&at)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await?;
                    if let Some((_, step)) = tree.iter().find(|(n, _)| n.id == id) {
                        let event = state_event(step, state, reason);
                        events.push(insert_event(tx, change_id, &event).await?);
                    }
                }
            },
            Update::Change { state, reason } => {
                let ended = query(
                    "UPDATE changes SET state = ?, reason = ?, finished_at = ? WHERE id = ? AND state = 'running'",
                )
                .bind(state.as_str())
                .bind(&reason)
                .bind(&at)
                .bind(change_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if ended == 1 {
                    let event = Event::ChangeState { state, reason };
                    events.push(insert_event(tx, change_id, &event).await?);
                }
            }
        }
    }
    Ok(events)
}

/// Makes the change's ready set on its start (or a retry's): see [`advance::resume`].
pub(super) async fn resume_in(
    tx: &mut Tx,
    change_id: &str,
) -> Result<Vec<EventRecord>, StoreError> {
    walk_in(tx, change_id, advance::resume).await
}

/// Ends the change's ready steps on a cancel, and what follows: see [`advance::cancel`].
pub(super) async fn cancel_in(
    tx: &mut Tx,
    change_id: &str,
) -> Result<Vec<EventRecord>, StoreError> {
    walk_in(tx, change_id, advance::cancel).await
}

/// Re-runs a step gets because its worker was lost, at most (then it fails like any other).
pub const MAX_WORKER_LOSSES: i64 = 3;

impl Store {
    /// Ends or re-queues the running steps of fleet changes whose worker is gone. In one transaction: reads the
    /// leases, asks `lost` about each such step (with its worker's lease); where it names the loss, a step whose
    /// action opts in with `retry_on_worker_loss` goes back to `ready` (at most [`MAX_WORKER_LOSSES`] times),
    /// any other ends `error` with that reason and the tree moves on. Either way its claim is void, so the lost
    /// worker, should it come back, writes nothing of it. Returns the events recorded.
    pub async fn reap_lost_steps<F>(&self, lost: F) -> Result<Vec<EventRecord>, StoreError>
    where
        F: Fn(&Step, &[crate::orchestrator::lease::Lease]) -> Option<String>,
    {
        let mut tx = self.write_tx().await?;
        let leases = super::changes::read_leases(&mut tx).await?;
        let rows = query(
            "SELECT s.*, s.claim AS held_claim FROM steps s JOIN changes c ON c.id = s.change_id \
             WHERE s.state = 'running' AND s.claim IS NOT NULL AND c.state = 'running' AND c.owner IS NULL \
             ORDER BY s.rowid",
        )
        .fetch_all(&mut tx)
        .await?;
        let mut events = Vec::new();
        let mut moved = Vec::new();
        for row in rows {
            let step = super::changes::step_row(&row);
            let claim: String = row.get("held_claim");
            let losses: i64 = row.get("worker_losses");
            let Some(why) = lost(&step, &leases) else {
                continue;
            };
            lock_change(&mut tx, self.backend(), &step.change_id).await?;
            if step.retry_on_worker_loss && losses < MAX_WORKER_LOSSES {
                query(
                    "UPDATE steps SET state = 'ready', claim = NULL, reason = NULL, worker_losses = worker_losses + 1 \
                     WHERE id = ? AND claim = ?",
                )
                .bind(&step.id)
                .bind(&claim)
                .execute(&mut tx)
                .await?;
                let reason =
                    format!("{why}; the step runs again on another worker (retry_on_worker_loss)");
                let event = state_event(&step, StepState::Ready, Some(reason));
                events.push(insert_event(&mut tx, &step.change_id, &event).await?);
            } else {
                let reason = if step.retry_on_worker_loss {
                    format!("{why}; it had already run again {losses} times, the most retry_on_worker_loss allows")
                } else {
                    why
                };
                query("UPDATE steps SET state = 'error', reason = ?, finished_at = ?, claim = NULL WHERE id = ? AND claim = ?")
                    .bind(&reason)
                    .bind(now())
                    .bind(&step.id)
                    .bind(&claim)
                    .execute(&mut tx)
                    .await?;
                let event = state_event(&step, StepState::Error, Some(reason));
                events.push(insert_event(&mut tx, &step.change_id, &event).await?);
                events.extend(advance_in(&mut tx, &step.change_id, &step.id).await?);
            }
            moved.push(step.change_id);
        }
        tx.commit().await?;
        for id in moved {
            self.moved(&id);
        }
        Ok(events)
    }
}
