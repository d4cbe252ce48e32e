//! Gets a change's events and its steps' output into the store, keeping up with verbose steps: output and events
//! go through one ordered channel whose bytes in flight are bounded (a producer waits once 8 MiB are queued),
//! are masked and cut into lines by a [`LineAssembler`], and are stored in few transactions — a batch closes at
//! 1 MiB or 100 ms — with lines packed into compressed chunks. Stored records are then broadcast to live
//! watchers. The same pipeline without the store feeds `RunStep`'s stream.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Semaphore};

use super::chunk::{self, ChunkLine};
use super::lines::{LineAssembler, OutputLine};
use super::LogLimits;
use crate::events::{Event, EventRecord, Phase};
use crate::executor::Stream;
use crate::mask::Masker;
use crate::store::{rfc3339_ms, BatchEntry, Store};

/// Output bytes that may wait between the producers (container, builder) and the store.
pub const IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;
/// A batch is stored once it holds this much output…
const BATCH_BYTES: usize = 1024 * 1024;
/// …or this long after its first entry arrived.
const BATCH_WAIT: Duration = Duration::from_millis(100);
/// Lines packed into one stored chunk, at most (bytes of text).
const CHUNK_BYTES: usize = 1024 * 1024;

enum Input {
    Event {
        event: Event,
        at_ms: i64,
    },
    Output {
        step_id: String,
        stream: Stream,
        bytes: Vec<u8>,
        at_ms: i64,
        permits: u32,
    },
}

impl Input {
    fn size(&self) -> usize {
        match self {
            Input::Event { .. } => 64,
            Input::Output { bytes, .. } => bytes.len(),
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Where a change run's (or a single step's) events and output go. Cheap to clone; the pipeline ends when every
/// clone is dropped.
#[derive(Clone)]
pub struct EventTx {
    tx: mpsc::UnboundedSender<Input>,
    masker: Masker,
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for EventTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventTx").finish_non_exhaustive()
    }
}

impl EventTx {
    /// Sends an event (masked on its way); fails only if the pipeline is gone. A [`Event::Log`] line is treated as
    /// that line of output.
    pub fn send(&self, event: Event) -> Result<(), mpsc::error::SendError<Event>> {
        if self.tx.is_closed() {
            return Err(mpsc::error::SendError(event));
        }
        let _ = self.tx.send(Input::Event {
            event,
            at_ms: now_ms(),
        });
        Ok(())
    }

    /// Sends raw output of a step's stream (any piece: part of a line, several lines); waits while too much
    /// output is already queued. False if the pipeline is gone.
    pub async fn output(&self, step_id: &str, stream: Stream, bytes: Vec<u8>) -> bool {
        if bytes.is_empty() {
            return !self.tx.is_closed();
        }
        let permits = bytes.len().clamp(1, IN_FLIGHT_BYTES) as u32;
        match self.budget.acquire_many(permits).await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        self.tx
            .send(Input::Output {
                step_id: step_id.to_owned(),
                stream,
                bytes,
                at_ms: now_ms(),
                permits,
            })
            .is_ok()
    }

    /// The masker this pipeline applies, for text that is stored elsewhere (a step's or change's reason).
    pub fn masker(&self) -> &Masker {
        &self.masker
    }

    fn channel(masker: Masker) -> (EventTx, mpsc::UnboundedReceiver<Input>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(IN_FLIGHT_BYTES));
        (EventTx { tx, masker, budget }, rx)
    }
}

/// What the pipeline produces, in order.
enum Item {
    Event(Event, i64),
    Line(ChunkLine),
}

struct Ingest {
    assembler: LineAssembler,
    masker: Masker,
    lines: Vec<OutputLine>,
}

impl Ingest {
    fn new(masker: Masker, limits: LogLimits) -> Ingest {
        Ingest {
            assembler: LineAssembler::new(masker.clone(), limits),
            masker,
            lines: Vec::new(),
        }
    }

    fn drain_lines(&mut self, at_ms: i64, items: &mut Vec<Item>) {
        items.extend(self.lines.drain(..).map(|l| {
            Item::Line(ChunkLine {
                step_id: l.step_id,
                stream: l.stream,
                at_ms,
                line: l.line,
            })
        }));
    }

    /// Turns one input into items; returns the budget it held.
    fn take(&mut self, input: Input, items: &mut Vec<Item>) -> u32 {
        match input {
            Input::Output {
                step_id,
                stream,
                bytes,
                at_ms,
                permits,
            } => {
                self.assembler
                    .push(&step_id, stream, &bytes, &mut self.lines);
                self.drain_lines(at_ms, items);
                permits
            }
            Input::Event {
                event:
                    Event::Log {
                        step_id,
                        stream,
                        mut line,
                    },
                at_ms,
            } => {
                line.push('\n');
                self.assembler
                    .push(&step_id, stream, line.as_bytes(), &mut self.lines);
                self.drain_lines(at_ms, items);
                0
            }
            Input::Event { event, at_ms } => {
                match &event {
                    Event::StepState { step_id, state, .. } if state.is_final() => {
                        self.assembler.finish_step(step_id, &mut self.lines)
                    }
                    Event::Phase {
                        step_id,
                        phase: Phase::BuildFinished | Phase::RunFinished,
                        ..
                    } => self.assembler.flush_step(step_id, &mut self.lines),
                    _ => {}
                }
                self.drain_lines(at_ms, items);
                items.push(Item::Event(self.masker.mask_event(event), at_ms));
                0
            }
        }
    }

    fn finish(&mut self, items: &mut Vec<Item>) {
        self.assembler.finish_all(&mut self.lines);
        self.drain_lines(now_ms(), items);
    }
}

/// Waits for the next input, then gathers more until the batch is big or old enough. `None` once the channel is
/// closed and empty.
async fn next_batch(
    rx: &mut mpsc::UnboundedReceiver<Input>,
    closed: &mut bool,
) -> Option<Vec<Input>> {
    let first = rx.recv().await?;
    let mut size = first.size();
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + BATCH_WAIT;
    while size < BATCH_BYTES {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(input)) => {
                size += input.size();
                batch.push(input);
            }
            Ok(None) => {
                *closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Runs the pipeline over batches: `sink` gets each batch's items; the budget is returned once it is done.
async fn run(
    mut rx: mpsc::UnboundedReceiver<Input>,
    budget: Arc<Semaphore>,
    mut ingest: Ingest,
    mut sink: impl FnMut(Vec<Item>) -> futures::future::BoxFuture<'static, ()>,
) {
    let mut closed = false;
    loop {
        let batch = if closed {
            None
        } else {
            next_batch(&mut rx, &mut closed).await
        };
        let mut items = Vec::new();
        let mut permits = 0usize;
        let ended = batch.is_none();
        for input in batch.into_iter().flatten() {
            permits += ingest.take(input, &mut items) as usize;
        }
        if ended || closed {
            ingest.finish(&mut items);
        }
        if !items.is_empty() {
            sink(items).await;
        }
        budget.add_permits(permits);
        if ended || closed {
            return;
        }
    }
}

/// Packs items into store entries: consecutive lines into chunks, events as they are.
fn entries(items: &[Item]) -> Vec<BatchEntry> {
    let mut out = Vec::new();
    let mut run: Vec<ChunkLine> = Vec::new();
    let mut run_bytes = 0usize;
    let flush = |run: &mut Vec<ChunkLine>, run_bytes: &mut usize, out: &mut Vec<BatchEntry>| {
        if run.is_empty() {
            return;
        }
        out.push(BatchEntry::Lines {
            count: run.len() as i64,
            first_at: run.first().map_or(0, |l| l.at_ms),
            last_at: run.last().map_or(0, |l| l.at_ms),
            text_bytes: *run_bytes as i64,
            chunk: chunk::encode(run),
        });
        run.clear();
        *run_bytes = 0;
    };
    for item in items {
        match item {
            Item::Line(line) => {
                run_bytes += line.line.len() + 1;
                run.push(line.clone());
                if run_bytes >= CHUNK_BYTES {
                    flush(&mut run, &mut run_bytes, &mut out);
                }
            }
            Item::Event(event, at_ms) => {
                flush(&mut run, &mut run_bytes, &mut out);
                out.push(BatchEntry::Event {
                    event: event.clone(),
                    at: rfc3339_ms(*at_ms),
                });
            }
        }
    }
    flush(&mut run, &mut run_bytes, &mut out);
    out
}

/// Starts the recorder of one change: every event and output line sent to the returned [`EventTx`] is masked,
/// stored, then broadcast on `live`. The task ends when every sender is dropped and everything is stored.
pub fn recorder(
    store: Store,
    live: broadcast::Sender<EventRecord>,
    change_id: &str,
    masker: Masker,
    limits: LogLimits,
) -> (EventTx, tokio::task::JoinHandle<()>) {
    let (tx, rx) = EventTx::channel(masker.clone());
    let budget = tx.budget.clone();
    let change_id = change_id.to_owned();
    let sink = move |items: Vec<Item>| {
        let (store, live, change_id) = (store.clone(), live.clone(), change_id.clone());
        Box::pin(async move {
            let entries = entries(&items);
            let (first, attempt) = match store.append_batch_in_attempt(&change_id, &entries).await {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::error!(error = %e, change_id, "failed to store events and log lines");
                    return;
                }
            };
            if live.receiver_count() == 0 {
                return;
            }
            for (item, seq) in items.into_iter().zip(first..) {
                let record = match item {
                    Item::Event(event, at_ms) => EventRecord {
                        change_id: change_id.clone(),
                        attempt,
                        seq,
                        at: rfc3339_ms(at_ms),
                        event,
                    },
                    Item::Line(line) => EventRecord {
                        change_id: change_id.clone(),
                        attempt,
                        seq,
                        at: rfc3339_ms(line.at_ms),
                        event: Event::Log {
                            step_id: line.step_id,
                            stream: line.stream,
                            line: line.line,
                        },
                    },
                };
                let _ = live.send(record);
            }
        }) as futures::future::BoxFuture<'static, ()>
    };
    let task = tokio::spawn(run(rx, budget, Ingest::new(masker, limits), sink));
    (tx, task)
}

/// The same pipeline without the store: masked events and assembled lines go to `sink` (a bounded channel, so a
/// slow reader slows the producers instead of filling memory).
pub fn pipe(
    masker: Masker,
    limits: LogLimits,
    sink: mpsc::Sender<Event>,
) -> (EventTx, tokio::task::JoinHandle<()>) {
    let (tx, rx) = EventTx::channel(masker.clone());
    let budget = tx.budget.clone();
    let send = move |items: Vec<Item>| {
        let sink = sink.clone();
        Box::pin(async move {
            for item in items {
                let event = match item {
                    Item::Event(event, _) => event,
                    Item::Line(line) => Event::Log {
                        step_id: line.step_id,
                        stream: line.stream,
                        line: line.line,
                    },
                };
                if sink.send(event).await.is_err() {
                    return;
                }
            }
        }) as futures::future::BoxFuture<'static, ()>
    };
    let task = tokio::spawn(run(rx, budget, Ingest::new(masker, limits), send));
    (tx, task)
}
