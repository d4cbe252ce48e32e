//! Changes, their steps, their event log and the leases of the runner processes that run them.

use super::db::{query, Row, Tx};
use serde::Serialize;

use super::{now, Store, StoreError};
use crate::events::{ChangeState, Event, EventRecord, StepState};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub id: String,
    pub project: String,
    pub environment: String,
    pub action: String,
    pub git_rev: String,
    pub git_sha: String,
    pub state: ChangeState,
    pub reason: Option<String>,
    pub owner: Option<String>,
    pub cancel_requested: bool,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// 1 from creation, one more per retry; what the record shows (the current attempt unless asked otherwise).
    pub attempt: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub id: String,
    pub change_id: String,
    pub parent_id: Option<String>,
    pub position: i64,
    pub action: String,
    pub state: StepState,
    pub reason: Option<String>,
    pub exit_code: Option<i64>,
    pub image_id: Option<String>,
    pub image_cached: Option<bool>,
    /// `step.properties` of the step's result: the merged properties the action saw.
    pub properties: Option<serde_json::Value>,
    pub project_version: Option<i64>,
    pub environment_version: Option<i64>,
    /// How the step's children run: `sequential` or `parallel`, once known.
    pub children_strategy: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The change's attempt that last ran (or recorded) the step: a step that succeeded in an earlier attempt is
    /// kept, not run again, and keeps that attempt's number.
    pub attempt: i64,
    /// The worker (lease owner) that claimed the step last; `None` before any did.
    pub worker: Option<String>,
    /// The action's `ignore_failure`: the step's failure does not fail its parent.
    pub ignore_failure: bool,
    /// The action's `retry_on_worker_loss`: the step runs again elsewhere if its worker is lost.
    pub retry_on_worker_loss: bool,
}

/// A step to record (a change's root, or a step's child): its id, its action and the action's flags the store
/// needs to advance the tree without the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewStep {
    pub id: String,
    pub action: String,
    pub ignore_failure: bool,
    pub retry_on_worker_loss: bool,
}

impl NewStep {
    /// A step of `action` as the manifest describes it (flags off for an action it does not know).
    pub fn of(action: &str, manifest: &crate::actions::Manifest) -> NewStep {
        let found = manifest.actions.get(action);
        NewStep {
            id: uuid::Uuid::new_v4().to_string(),
            action: action.to_owned(),
            ignore_failure: found.is_some_and(|a| a.ignore_failure),
            retry_on_worker_loss: found.is_some_and(|a| a.retry_on_worker_loss),
        }
    }
}

/// A change to create.
#[derive(Debug, Clone)]
pub struct NewChange<'a> {
    pub id: &'a str,
    pub project_id: i64,
    pub environment_id: i64,
    pub action: &'a str,
    pub git_rev: &'a str,
    pub git_sha: &'a str,
    pub root_step_id: &'a str,
    /// The runner process answerable for the change from its creation (its lease says whether it lives).
    pub owner: &'a str,
    /// A scheduler's labels, stored with the change.
    pub labels: &'a super::Labels,
}

/// What finishing a step records.
#[derive(Debug, Clone, Default)]
pub struct StepFinish {
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub properties: Option<serde_json::Value>,
}

/// Filter for [`Store::list_changes`].
#[derive(Debug, Clone, Default)]
pub struct ChangeFilter {
    pub project: Option<String>,
    pub environment: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

pub(super) const CHANGE_SELECT: &str =
    "SELECT c.*, p.code AS project_code, e.code AS environment_code FROM changes c \
     JOIN projects p ON p.id = c.project_id JOIN environments e ON e.id = c.environment_id";

pub(super) fn change_row(row: &Row) -> Change {
    Change {
        id: row.get("id"),
        project: row.get("project_code"),
        environment: row.get("environment_code"),
        action: row.get("action"),
        git_rev: row.get("git_rev"),
        git_sha: row.get("git_sha"),
        state: ChangeState::parse(row.get("state")).unwrap_or(ChangeState::Error),
        reason: row.get("reason"),
        owner: row.get("owner"),
        cancel_requested: row.get::<i64, _>("cancel_requested") != 0,
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        attempt: row.get("attempt"),
    }
}

pub(super) fn step_row(row: &Row) -> Step {
    Step {
        id: row.get("id"),
        change_id: row.get("change_id"),
        parent_id: row.get("parent_id"),
        position: row.get("position"),
        action: row.get("action"),
        state: StepState::parse(row.get("state")).unwrap_or(StepState::Error),
        reason: row.get("reason"),
        exit_code: row.get("exit_code"),
        image_id: row.get("image_id"),
        image_cached: row.get::<Option<i64>, _>("image_cached").map(|c| c != 0),
        properties: row
            .get::<Option<String>, _>("properties")
            .and_then(|p| serde_json::from_str(&p).ok()),
        project_version: row.get("project_version"),
        environment_version: row.get("environment_version"),
        children_strategy: row.get("children_strategy"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        attempt: row.get("attempt"),
        worker: row.get("worker"),
        ignore_failure: row.get::<i64, _>("ignore_failure") != 0,
        retry_on_worker_loss: row.get::<i64, _>("retry_on_worker_loss") != 0,
    }
}

pub(super) fn not_found(what: &'static str, id: &str, hint: &str) -> StoreError {
    StoreError::NotFound {
        what,
        code: id.to_owned(),
        hint: hint.to_owned(),
    }
}

impl Store {
    /// Creates a pending change with its root step (flags off).
    pub async fn create_change(&self, new: &NewChange<'_>) -> Result<(), StoreError> {
        self.create_change_with_root(new, false, false).await
    }

    /// Creates a pending change with its root step, which has the action's `ignore_failure` and
    /// `retry_on_worker_loss` flags.
    pub async fn create_change_with_root(
        &self,
        new: &NewChange<'_>,
        ignore_failure: bool,
        retry_on_worker_loss: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let at = now();
        query(
            "INSERT INTO changes (id, project_id, environment_id, action, git_rev, git_sha, state, owner, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, 'pending', NULLIF(?, ''), ?)",
        )
        .bind(new.id)
        .bind(new.project_id)
        .bind(new.environment_id)
        .bind(new.action)
        .bind(new.git_rev)
        .bind(new.git_sha)
        .bind(new.owner)
        .bind(&at)
        .execute(&mut tx)
        .await?;
        query(
            "INSERT INTO steps (id, change_id, parent_id, position, action, state, ignore_failure, \
             retry_on_worker_loss) VALUES (?, ?, NULL, 0, ?, 'pending', ?, ?)",
        )
        .bind(new.root_step_id)
        .bind(new.id)
        .bind(new.action)
        .bind(ignore_failure)
        .bind(retry_on_worker_loss)
        .execute(&mut tx)
        .await?;
        super::labels::insert_labels(&mut tx, new.id, new.labels).await?;
        tx.commit().await?;
        self.work_changed();
        Ok(())
    }

    pub async fn change(&self, id: &str) -> Result<Change, StoreError> {
        query(format!("{CHANGE_SELECT} WHERE c.id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| change_row(&row))
            .ok_or_else(|| not_found("change", id, ": list changes with `runner change list`"))
    }

    /// Newest first.
    pub async fn list_changes(&self, filter: &ChangeFilter) -> Result<Vec<Change>, StoreError> {
        let limit = if filter.limit <= 0 {
            i64::MAX
        } else {
            filter.limit
        };
        let rows = query(format!(
            "{CHANGE_SELECT} WHERE (? IS NULL OR p.code = ?) AND (? IS NULL OR e.code = ?) \
             ORDER BY c.created_at DESC, c.rowid DESC LIMIT ? OFFSET ?"
        ))
        .bind(&filter.project)
        .bind(&filter.project)
        .bind(&filter.environment)
        .bind(&filter.environment)
        .bind(limit)
        .bind(filter.offset)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// Asks a change to stop. In the same transaction, its steps that wait for a worker (ready) end `cancelled`
    /// and the tree moves on from them, so a change none of whose steps runs ends at once; running steps are
    /// stopped by their workers. Returns the events recorded.
    pub async fn request_cancel(&self, id: &str) -> Result<Vec<EventRecord>, StoreError> {
        let mut tx = self.pool.row_tx().await?;
        // The update locks the change's row: cancels and step ends of one change go one at a time.
        let state: Option<String> =
            query("UPDATE changes SET cancel_requested = 1 WHERE id = ? RETURNING state")
                .bind(id)
                .fetch_optional(&mut tx)
                .await?
                .map(|row| row.get(0));
        let events = if state.as_deref() == Some("running") {
            super::claims::cancel_in(&mut tx, id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.moved(id);
        Ok(events)
    }

    pub async fn steps(&self, change_id: &str) -> Result<Vec<Step>, StoreError> {
        let rows = query("SELECT * FROM steps WHERE change_id = ? ORDER BY rowid")
            .bind(change_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(step_row).collect())
    }

    pub async fn step(&self, id: &str) -> Result<Step, StoreError> {
        query("SELECT * FROM steps WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| step_row(&row))
            .ok_or_else(|| {
                not_found(
                    "step",
                    id,
                    ": see the step ids with `runner change show CHANGE_ID`",
                )
            })
    }

    pub async fn set_step_image(
        &self,
        id: &str,
        image_id: &str,
        cached: bool,
    ) -> Result<(), StoreError> {
        query("UPDATE steps SET image_id = ?, image_cached = ? WHERE id = ?")
            .bind(image_id)
            .bind(cached)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a step's end as given, with no claim to check and without moving the tree on: for the store's
    /// own tests. A runner ends the steps it claimed with [`Store::end_step`] / [`Store::settle_step`], whose
    /// claim token fences out a worker that lost the step.
    pub async fn finish_step(
        &self,
        id: &str,
        state: StepState,
        finish: &StepFinish,
    ) -> Result<(), StoreError> {
        query(
            "UPDATE steps SET state = ?, exit_code = COALESCE(?, exit_code), reason = ?, \
             properties = COALESCE(?, properties), finished_at = ? WHERE id = ?",
        )
        .bind(state.as_str())
        .bind(finish.exit_code)
        .bind(&finish.reason)
        .bind(finish.properties.as_ref().map(|p| p.to_string()))
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends an event; its number is the change's next one.
    pub async fn append_event(
        &self,
        change_id: &str,
        event: &Event,
    ) -> Result<EventRecord, StoreError> {
        let at = now();
        let entry = super::BatchEntry::Event {
            event: event.clone(),
            at: at.clone(),
        };
        let (seq, attempt) = self.append_batch_in_attempt(change_id, &[entry]).await?;
        Ok(EventRecord {
            change_id: change_id.to_owned(),
            attempt,
            seq,
            at,
            event: event.clone(),
        })
    }

    /// The change's events (log lines included) after `after_seq`, in order.
    pub async fn events_after(
        &self,
        change_id: &str,
        after_seq: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.events_between(change_id, after_seq, None).await
    }

    /// Takes or renews `owner`'s lease until `expires_at` (unix milliseconds).
    pub async fn renew_lease(
        &self,
        owner: &str,
        host: &str,
        pid: u32,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        query(
            "INSERT INTO leases (owner, host, pid, expires_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (owner) DO UPDATE SET host = excluded.host, pid = excluded.pid, expires_at = excluded.expires_at",
        )
        .bind(owner)
        .bind(host)
        .bind(pid as i64)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes or renews `owner`'s lease for `ttl` from now by the database's clock (see [`Store::clock_ms`]).
    pub async fn renew_lease_for(
        &self,
        owner: &str,
        host: &str,
        pid: u32,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        let now = self.backend().now_ms_sql();
        query(format!(
            "INSERT INTO leases (owner, host, pid, expires_at) VALUES (?, ?, ?, {now} + ?) \
             ON CONFLICT (owner) DO UPDATE SET host = excluded.host, pid = excluded.pid, expires_at = excluded.expires_at"
        ))
        .bind(owner)
        .bind(host)
        .bind(pid as i64)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews `owner`'s lease for `ttl` from now (the database's clock) only if it is still live: false when it
    /// expired or is gone, in which case the owner has been (or may be) judged dead and must write nothing more.
    pub async fn renew_live_lease(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let now = self.backend().now_ms_sql();
        let renewed = query(format!(
            "UPDATE leases SET expires_at = {now} + ? WHERE owner = ? AND expires_at >= {now}"
        ))
        .bind(ttl.as_millis() as i64)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// The database's clock in Unix milliseconds: what lease expiries are compared with, so hosts whose clocks
    /// disagree still agree on which leases ran out.
    pub async fn clock_ms(&self) -> Result<i64, StoreError> {
        Ok(query(format!("SELECT {}", self.backend().now_ms_sql()))
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    pub async fn drop_lease(&self, owner: &str) -> Result<(), StoreError> {
        query("DELETE FROM leases WHERE owner = ?")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn leases(&self) -> Result<Vec<crate::orchestrator::lease::Lease>, StoreError> {
        read_leases(&self.pool).await
    }

    /// Changes still marked running or queued by an owner, for the reaper.
    pub async fn unfinished_changes(&self) -> Result<Vec<Change>, StoreError> {
        let rows = query(format!(
            "{CHANGE_SELECT} WHERE c.state IN ('running', 'queued', 'pending') ORDER BY c.created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(change_row).collect())
    }
}

/// Records the children a step will run and how, replacing any from an earlier attempt (a step that runs again may
/// produce different dynamic children).
pub(super) async fn replace_children(
    tx: &mut Tx,
    change_id: &str,
    parent_id: &str,
    strategy: &str,
    children: &[NewStep],
) -> Result<(), StoreError> {
    // Scoped to the change (all its descendants are its steps): both halves of the walk read the change's own
    // steps by index, not every step the store holds.
    query(
        "WITH RECURSIVE below(id) AS (SELECT id FROM steps WHERE change_id = ?1 AND parent_id = ?2 \
           UNION ALL SELECT s.id FROM steps s JOIN below b ON s.parent_id = b.id WHERE s.change_id = ?1) \
         DELETE FROM steps WHERE id IN (SELECT id FROM below)",
    )
    .bind(change_id)
    .bind(parent_id)
    .execute(&mut *tx)
    .await?;
    query("UPDATE steps SET children_strategy = ? WHERE id = ?")
        .bind(strategy)
        .bind(parent_id)
        .execute(&mut *tx)
        .await?;
    for (position, child) in children.iter().enumerate() {
        query(
            "INSERT INTO steps (id, change_id, parent_id, position, action, state, attempt, ignore_failure, \
             retry_on_worker_loss) \
             VALUES (?, ?, ?, ?, ?, 'pending', (SELECT attempt FROM changes WHERE id = ?), ?, ?)",
        )
        .bind(&child.id)
        .bind(change_id)
        .bind(parent_id)
        .bind(position as i64)
        .bind(&child.action)
        .bind(change_id)
        .bind(child.ignore_failure)
        .bind(child.retry_on_worker_loss)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Every lease, read on `on`: the pool, or the transaction whose decisions are judged against them.
pub(super) async fn read_leases<'e>(
    on: impl super::db::Executor<'e>,
) -> Result<Vec<crate::orchestrator::lease::Lease>, StoreError> {
    Ok(query("SELECT owner, host, pid, expires_at FROM leases")
        .fetch_all(on)
        .await?
        .iter()
        .map(|r| crate::orchestrator::lease::Lease {
            owner: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            expires_at: r.get(3),
        })
        .collect())
}
