//! A change's attempts: attempt 1 from its creation, one more per retry. The current attempt is what `changes` and
//! `steps` hold; a retry first copies the ended attempt (the change's state and reason, its whole step tree and
//! the number of its last event) into `change_attempts` and `step_attempts`, so earlier attempts stay readable.

use super::changes::{not_found, step_row, Change, Step};
use super::db::{query, Row, Tx};
use super::{Store, StoreError};
use crate::events::ChangeState;

/// Copies the change's current attempt into the archive tables if the change ended in error or was cancelled;
/// false (nothing written) otherwise.
pub(super) async fn archive_attempt(tx: &mut Tx, change_id: &str) -> Result<bool, StoreError> {
    let archived = query(
        "INSERT INTO change_attempts (change_id, attempt, state, reason, started_at, finished_at, last_seq) \
         SELECT id, attempt, state, reason, started_at, finished_at, last_seq FROM changes \
         WHERE id = ? AND state IN ('error', 'cancelled')",
    )
    .bind(change_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if archived != 1 {
        return Ok(false);
    }
    query(
        "INSERT INTO step_attempts (change_id, attempt, ord, id, step_attempt, parent_id, position, action, state, \
         reason, exit_code, image_id, image_cached, properties, children_strategy, project_version, \
         environment_version, started_at, finished_at, worker, ignore_failure, retry_on_worker_loss) \
         SELECT s.change_id, c.attempt, s.rowid, s.id, s.attempt, s.parent_id, s.position, s.action, s.state, \
         s.reason, s.exit_code, s.image_id, s.image_cached, s.properties, s.children_strategy, s.project_version, \
         s.environment_version, s.started_at, s.finished_at, s.worker, s.ignore_failure, \
         s.retry_on_worker_loss FROM steps s JOIN changes c ON c.id = s.change_id WHERE s.change_id = ?",
    )
    .bind(change_id)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

fn archived_step_row(row: &Row) -> Step {
    let mut step = step_row(row);
    step.attempt = row.get("step_attempt");
    step
}

impl Store {
    /// The change as it was in `attempt` (0 or the current attempt: as it is now). An attempt it never had is
    /// NotFound.
    pub async fn change_in_attempt(&self, id: &str, attempt: i64) -> Result<Change, StoreError> {
        let mut change = self.change(id).await?;
        if attempt == 0 || attempt == change.attempt {
            return Ok(change);
        }
        let row = query(
            "SELECT state, reason, started_at, finished_at FROM change_attempts WHERE change_id = ? AND attempt = ?",
        )
        .bind(id)
        .bind(attempt)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| no_attempt(id, attempt, change.attempt))?;
        change.attempt = attempt;
        change.state = ChangeState::parse(row.get("state")).unwrap_or(ChangeState::Error);
        change.reason = row.get("reason");
        change.started_at = row.get("started_at");
        change.finished_at = row.get("finished_at");
        change.cancel_requested = false;
        Ok(change)
    }

    /// The change's step tree as it was in `attempt` (0: the current attempt). Steps kept from an earlier attempt
    /// (they succeeded there) say so by their own `attempt`.
    pub async fn steps_in_attempt(
        &self,
        change_id: &str,
        attempt: i64,
    ) -> Result<Vec<Step>, StoreError> {
        let change = self.change(change_id).await?;
        if attempt == 0 || attempt == change.attempt {
            return self.steps(change_id).await;
        }
        if attempt < 0 || attempt > change.attempt {
            return Err(no_attempt(change_id, attempt, change.attempt));
        }
        let rows =
            query("SELECT * FROM step_attempts WHERE change_id = ? AND attempt = ? ORDER BY ord")
                .bind(change_id)
                .bind(attempt)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(archived_step_row).collect())
    }

    /// One step as it was in `attempt` (0: now).
    pub async fn step_in_attempt(&self, id: &str, attempt: i64) -> Result<Step, StoreError> {
        let step = self.step(id).await?;
        if attempt == 0 {
            return Ok(step);
        }
        self.steps_in_attempt(&step.change_id, attempt)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| not_found("step", id, &format!(" in attempt {attempt}")))
    }

    /// The last event number of each ended attempt that was retried, in attempt order: events after the k-th
    /// belong to attempt k + 2.
    pub(super) async fn attempt_bounds(&self, change_id: &str) -> Result<Vec<i64>, StoreError> {
        Ok(
            query("SELECT last_seq FROM change_attempts WHERE change_id = ? ORDER BY attempt")
                .bind(change_id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        )
    }
}

/// The attempt an event numbered `seq` belongs to, given [`Store::attempt_bounds`].
pub(super) fn attempt_of(bounds: &[i64], seq: i64) -> i64 {
    1 + bounds.iter().filter(|last| **last < seq).count() as i64
}

fn no_attempt(id: &str, attempt: i64, current: i64) -> StoreError {
    not_found(
        "attempt",
        &attempt.to_string(),
        &format!(" in change {id} (it has had attempts 1 to {current})"),
    )
}
