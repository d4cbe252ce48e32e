//! The server's own log of what its changes do: each stored event of a change this process runs becomes one
//! `tracing` line carrying the change's `change_id` (and the step's `step_id`), so `--log-format json` lines can
//! be joined with the store, the API and `/metrics`. A step's output is not repeated here: it is in the store
//! (`runner change show-logs`).

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventRecord};
use crate::orchestrator::Orchestrator;

/// Logs the orchestrator's events until `stop`.
pub async fn log_events(orchestrator: Orchestrator, stop: CancellationToken) {
    let mut live = orchestrator.subscribe();
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return,
            r = live.recv() => r,
        };
        match record {
            Ok(record) => log(&record),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the event log fell behind; some events are not logged"
                )
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn log(record: &EventRecord) {
    let change_id = record.change_id.as_str();
    match &record.event {
        Event::ChangeState { state, reason } => tracing::info!(
            change_id,
            seq = record.seq,
            state = state.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "change {state}"
        ),
        Event::StepState {
            step_id,
            action,
            state,
            reason,
            ..
        } => tracing::info!(
            change_id,
            step_id = step_id.as_str(),
            seq = record.seq,
            action = action.as_str(),
            state = state.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "step {action} {state}"
        ),
        Event::Phase {
            step_id, message, ..
        } => tracing::info!(
            change_id,
            step_id = step_id.as_str(),
            seq = record.seq,
            "{message}"
        ),
        Event::Build {
            step_id,
            vertex,
            status,
        } => tracing::debug!(
            change_id,
            step_id = step_id.as_str(),
            seq = record.seq,
            status = ?status,
            "build: {vertex}"
        ),
        Event::Log { .. } => {}
    }
}
