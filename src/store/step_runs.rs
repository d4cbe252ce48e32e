//! Step runs of external schedulers: created running, their events appended with per-run sequence numbers, ended
//! once (compare-and-set from `running`) with an outcome and either the step's result or the error that stopped
//! the run. Kept after they end, so a caller that lost its connection reads and watches them again.

use super::db::{query, Row};
use super::{now, Store, StoreError};
use crate::events::Event;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepRunOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl StepRunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepRunOutcome::Succeeded => "succeeded",
            StepRunOutcome::Failed => "failed",
            StepRunOutcome::TimedOut => "timed_out",
            StepRunOutcome::Cancelled => "cancelled",
        }
    }
    pub fn parse(text: &str) -> Option<StepRunOutcome> {
        [
            StepRunOutcome::Succeeded,
            StepRunOutcome::Failed,
            StepRunOutcome::TimedOut,
            StepRunOutcome::Cancelled,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRunRecord {
    pub id: String,
    pub owner: String,
    /// Of the request that started it: a repeat must match.
    pub fingerprint: String,
    pub git_remote: String,
    pub git_rev: String,
    pub action: String,
    pub labels: super::Labels,
    /// `running` or `ended`.
    pub ended: bool,
    pub outcome: Option<StepRunOutcome>,
    pub cancel_requested: bool,
    /// The wire result (encoded by the API layer), once the step ran to its end.
    pub result: Option<String>,
    /// The gRPC code, reason and message of the error that ended the run, if one did.
    pub error: Option<(i32, String, String)>,
    pub created_at: String,
    pub ended_at: Option<String>,
    pub duration_ms: Option<i64>,
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewStepRun<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub fingerprint: &'a str,
    pub git_remote: &'a str,
    pub git_rev: &'a str,
    pub action: &'a str,
    pub labels: &'a super::Labels,
}

/// How a run ends.
#[derive(Debug, Clone)]
pub struct StepRunEnd {
    pub outcome: StepRunOutcome,
    pub result: Option<String>,
    pub error: Option<(i32, String, String)>,
    pub duration_ms: i64,
}

/// One stored event of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRunEvent {
    pub seq: i64,
    pub at: String,
    pub event: Event,
}

fn record(row: &Row) -> StepRunRecord {
    let code: Option<i64> = row.get("error_code");
    StepRunRecord {
        id: row.get("id"),
        owner: row.get("owner"),
        fingerprint: row.get("fingerprint"),
        git_remote: row.get("git_remote"),
        git_rev: row.get("git_rev"),
        action: row.get("action"),
        labels: serde_json::from_str(&row.get::<String, _>("labels")).unwrap_or_default(),
        ended: row.get::<String, _>("state") == "ended",
        outcome: row
            .get::<Option<String>, _>("outcome")
            .as_deref()
            .and_then(StepRunOutcome::parse),
        cancel_requested: row.get::<i64, _>("cancel_requested") != 0,
        result: row.get("result"),
        error: code.map(|code| {
            (
                code as i32,
                row.get::<Option<String>, _>("error_reason")
                    .unwrap_or_default(),
                row.get::<Option<String>, _>("error_message")
                    .unwrap_or_default(),
            )
        }),
        created_at: row.get("created_at"),
        ended_at: row.get("ended_at"),
        duration_ms: row.get("duration_ms"),
    }
}

impl Store {
    /// Creates a running run; `Err(existing)` if the id is taken.
    pub async fn create_step_run(
        &self,
        new: &NewStepRun<'_>,
    ) -> Result<Result<StepRunRecord, StepRunRecord>, StoreError> {
        let inserted = query(
            "INSERT INTO step_runs (id, owner, fingerprint, git_remote, git_rev, action, labels, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(new.id)
        .bind(new.owner)
        .bind(new.fingerprint)
        .bind(new.git_remote)
        .bind(new.git_rev)
        .bind(new.action)
        .bind(serde_json::to_string(new.labels).unwrap_or_default())
        .bind(now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        let run = self.step_run(new.id).await?;
        Ok(if inserted == 1 { Ok(run) } else { Err(run) })
    }

    pub async fn step_run(&self, id: &str) -> Result<StepRunRecord, StoreError> {
        query("SELECT * FROM step_runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| record(&row))
            .ok_or_else(|| StoreError::NotFound {
                what: "step run",
                code: id.to_owned(),
                hint: String::new(),
            })
    }

    /// Appends an event; returns its sequence number.
    pub async fn append_step_run_event(
        &self,
        run_id: &str,
        event: &Event,
    ) -> Result<StepRunEvent, StoreError> {
        let mut tx = self.write_tx().await?;
        let seq: i64 =
            query("SELECT COALESCE(MAX(seq), 0) + 1 FROM step_run_events WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&mut tx)
                .await?
                .get(0);
        let at = now();
        query("INSERT INTO step_run_events (run_id, seq, at, event) VALUES ($1, $2, $3, $4)")
            .bind(run_id)
            .bind(seq)
            .bind(&at)
            .bind(serde_json::to_string(event).unwrap_or_default())
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        self.step_run_changed(run_id);
        Ok(StepRunEvent {
            seq,
            at,
            event: event.clone(),
        })
    }

    /// The run's events after `after`, in order (at most `limit`).
    pub async fn step_run_events_after(
        &self,
        run_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StepRunEvent>, StoreError> {
        let rows = query(
            "SELECT seq, at, event FROM step_run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(run_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(StepRunEvent {
                    seq: row.get(0),
                    at: row.get(1),
                    event: serde_json::from_str(&row.get::<String, _>(2)).ok()?,
                })
            })
            .collect())
    }

    pub async fn step_run_last_seq(&self, run_id: &str) -> Result<i64, StoreError> {
        Ok(
            query("SELECT COALESCE(MAX(seq), 0) FROM step_run_events WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&self.pool)
                .await?
                .get(0),
        )
    }

    /// Marks a running run as asked to stop.
    pub async fn request_step_run_cancel(&self, id: &str) -> Result<(), StoreError> {
        query("UPDATE step_runs SET cancel_requested = 1 WHERE id = $1 AND state = 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.step_run_changed(id);
        Ok(())
    }

    /// Ends a running run, once: false if it had ended already.
    pub async fn end_step_run(&self, id: &str, end: &StepRunEnd) -> Result<bool, StoreError> {
        let (code, reason, message) = match &end.error {
            Some((code, reason, message)) => (
                Some(*code as i64),
                Some(reason.clone()),
                Some(message.clone()),
            ),
            None => (None, None, None),
        };
        let done = query(
            "UPDATE step_runs SET state = 'ended', outcome = $1, result = $2, error_code = $3, error_reason = $4, \
             error_message = $5, ended_at = $6, duration_ms = $7 WHERE id = $8 AND state = 'running'",
        )
        .bind(end.outcome.as_str())
        .bind(&end.result)
        .bind(code)
        .bind(reason)
        .bind(message)
        .bind(now())
        .bind(end.duration_ms)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.step_run_changed(id);
        Ok(done == 1)
    }
}
