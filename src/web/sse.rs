//! Live updates as Server-Sent Events. Every stream reads the store (so changes run by another process show up
//! too) and wakes when this process's orchestrator stores an event, when the store says what it follows moved
//! (a PostgreSQL notification from whichever worker wrote it, see `store::wakeups`), or at the latest every
//! [`POLL`] (or the store's fallback, if longer); it ends with an `end` event once what it follows is over, and
//! at shutdown.

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::error::PageError;
use super::pages::step::stream_class;
use super::AppState;
use crate::events::{ChangeState, Event, EventRecord};
use crate::store::{Signal, Store};

/// The longest a stream waits before looking at the store again, unless the store's fallback is longer.
const POLL: Duration = Duration::from_millis(500);
/// Ids one badges stream follows at most (a page shows 50).
const MAX_IDS: usize = 100;

type Events =
    Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<SseEvent, Infallible>>>>;

/// Waits for a reason to look at the store again: this process stored an event, the store signalled, [`POLL`]
/// passed, or shutdown. Returns false at shutdown.
struct Wake {
    live: broadcast::Receiver<EventRecord>,
    stored: Signal,
    stop: CancellationToken,
}

impl Wake {
    async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.live.recv() => {
                // Let a burst (a step's log lines) land before reading it in one go.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while self.live.try_recv().is_ok() {}
                true
            }
            _ = self.stored.wait_at_most(POLL.max(self.stored.fallback())) => true,
        }
    }
}

/// Starts a stream's `body`; `stored` is the store's signal for what it follows, taken before `body` first reads.
fn spawn_stream<F, Fut>(state: &AppState, stored: Signal, body: F) -> Events
where
    F: FnOnce(Store, mpsc::Sender<Result<SseEvent, Infallible>>, Wake) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(256);
    let wake = Wake {
        live: state.orchestrator.subscribe(),
        stored,
        stop: state.stop.clone(),
    };
    tokio::spawn(body(state.store().clone(), tx, wake));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

fn event(name: &str, data: String) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event(name).data(data))
}

fn is_final(record: &EventRecord) -> bool {
    matches!(record.event, Event::ChangeState { state, .. } if state.is_final())
}

/// `update` whenever the change's state, a step's state, a phase or a build moved (not for every log line);
/// `end` once the change is over.
pub async fn change(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Events, PageError> {
    let after = state.store().last_seq(&id).await?;
    state.store().change(&id).await?;
    let stored = state.store().change_signal(&id).await;
    Ok(spawn_stream(
        &state,
        stored,
        move |store, tx, mut wake| async move {
            let mut last = after;
            // Whatever happened between the page's render and this stream is news too.
            let mut first = true;
            loop {
                let records = match store.events_after(&id, last).await {
                    Ok(records) => records,
                    Err(_) => return,
                };
                let changed = records
                    .iter()
                    .any(|r| !matches!(r.event, Event::Log { .. }));
                if let Some(r) = records.last() {
                    last = r.seq;
                }
                if (changed || first) && tx.send(event("update", last.to_string())).await.is_err() {
                    return;
                }
                first = false;
                let over = records.iter().any(is_final)
                    || store
                        .change(&id)
                        .await
                        .map(|c| c.state.is_final())
                        .unwrap_or(true);
                if over {
                    let _ = tx.send(event("end", last.to_string())).await;
                    return;
                }
                if !wake.next().await {
                    return;
                }
            }
        },
    ))
}

#[derive(Debug, Deserialize)]
pub struct AfterQuery {
    after: Option<i64>,
}

/// A step's `log` lines (`{stream, line, service}`) and `phase`s after `after`; `end` once the step is over.
pub async fn step(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<AfterQuery>,
) -> Result<Events, PageError> {
    let step = state.store().step(&id).await?;
    let masker = super::pages::masker(state.orchestrator.app())?;
    let stored = state.store().change_signal(&step.change_id).await;
    Ok(spawn_stream(
        &state,
        stored,
        move |store, tx, mut wake| async move {
            let mut last = q.after.unwrap_or(0).max(0);
            loop {
                let records = match store.events_after(&step.change_id, last).await {
                    Ok(records) => records,
                    Err(_) => return,
                };
                let mut over = false;
                for r in &records {
                    last = r.seq;
                    over |= is_final(r);
                    let sent = match &r.event {
                        Event::Log {
                            step_id,
                            stream,
                            line,
                        } if *step_id == id => Some(event(
                            "log",
                            serde_json::json!({
                                "stream": stream_class(*stream),
                                "line": line,
                                "service": crate::events::service_of(line).is_some(),
                            })
                            .to_string(),
                        )),
                        Event::Phase {
                            step_id, message, ..
                        } if *step_id == id => Some(event(
                            "phase",
                            serde_json::json!({ "text": masker.mask(message) }).to_string(),
                        )),
                        Event::StepState { step_id, state, .. }
                            if *step_id == id && state.is_final() =>
                        {
                            over = true;
                            None
                        }
                        _ => None,
                    };
                    if let Some(sent) = sent {
                        if tx.send(sent).await.is_err() {
                            return;
                        }
                    }
                }
                if !over {
                    over = store
                        .step(&id)
                        .await
                        .map(|s| s.state.is_final())
                        .unwrap_or(true)
                        && store
                            .events_after(&step.change_id, last)
                            .await
                            .map(|r| r.is_empty())
                            .unwrap_or(true);
                }
                if over {
                    let _ = tx.send(event("end", last.to_string())).await;
                    return;
                }
                if !wake.next().await {
                    return;
                }
            }
        },
    ))
}

#[derive(Debug, Deserialize)]
pub struct IdsQuery {
    #[serde(default)]
    ids: String,
}

/// `state` (`{id, state}`) whenever one of the listed changes moves; `end` once all are over.
pub async fn badges(
    State(state): State<AppState>,
    Query(q): Query<IdsQuery>,
) -> Result<Events, PageError> {
    let ids: Vec<String> = q
        .ids
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.len() > MAX_IDS {
        return Err(PageError::BadRequest(format!(
            "{} change ids given: follow at most {MAX_IDS} at a time",
            ids.len()
        )));
    }
    let stored = state.store().changes_signal(&ids).await;
    Ok(spawn_stream(
        &state,
        stored,
        move |store, tx, mut wake| async move {
            let mut known: HashMap<String, Option<ChangeState>> =
                ids.into_iter().map(|id| (id, None)).collect();
            loop {
                for (id, seen) in known.iter_mut() {
                    if seen.is_some_and(|s| s.is_final()) {
                        continue;
                    }
                    let Ok(change) = store.change(id).await else {
                        *seen = Some(ChangeState::Error);
                        continue;
                    };
                    if *seen != Some(change.state) {
                        *seen = Some(change.state);
                        let data = serde_json::json!({"id": id, "state": change.state.as_str()});
                        if tx.send(event("state", data.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
                if known.values().all(|s| s.is_some_and(|s| s.is_final())) {
                    let _ = tx.send(event("end", String::new())).await;
                    return;
                }
                if !wake.next().await {
                    return;
                }
            }
        },
    ))
}
