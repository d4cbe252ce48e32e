//! `StepRunnerService`: step runs for a scheduler with its own change model, as resources. A run lives in the
//! server, not in the call that started it: its events and its end are stored as they happen, so the caller can
//! reconnect, read it and watch it again from any `seq`. `cancel_on_disconnect` ties a run to its RunStep call.

use futures::Stream;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};
use tonic_types::ErrorDetails;

use super::redact::Redactor;
use super::status::{bad_field, required, shutting_down, with_reason};
use super::step_run_wire as wire;
use super::{list_filter, pb};
use crate::error::Error;
use crate::orchestrator::{Orchestrator, SingleStep};
use crate::store::{NewStepRun, StepRunEnd, StepRunOutcome, StepRunRecord};

pub struct StepRunner {
    pub orchestrator: Orchestrator,
    /// Running steps, so shutdown waits for them.
    pub tasks: TaskTracker,
    /// Cancels running steps when the server's grace period is over.
    pub stop_runs: CancellationToken,
    /// Ends watch streams at shutdown (with UNAVAILABLE).
    pub stop_watches: CancellationToken,
    /// The id of a run whose events or state just moved.
    live: broadcast::Sender<String>,
    /// The runs of this server that have not ended, to cancel them.
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

type RunStepStream = Pin<Box<dyn Stream<Item = Result<pb::RunStepEvent, Status>> + Send>>;

/// Events read from the store at a time while catching up.
const CATCH_UP: i64 = 1000;

fn valid_run_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn fingerprint(r: &pb::RunStepRequest) -> String {
    use sha2::Digest;
    let mut r = r.clone();
    r.step_run_id.clear();
    r.request_id.clear();
    r.cancel_on_disconnect = false;
    // Labels are a map: hash them in key order, so the same request always has the same fingerprint.
    let labels: std::collections::BTreeMap<_, _> =
        std::mem::take(&mut r.labels).into_iter().collect();
    let mut hash = sha2::Sha256::new();
    hash.update(prost::Message::encode_to_vec(&r));
    hash.update(format!("{labels:?}"));
    hex::encode(hash.finalize())
}

impl StepRunner {
    pub fn new(
        orchestrator: Orchestrator,
        tasks: TaskTracker,
        stop_runs: CancellationToken,
        stop_watches: CancellationToken,
    ) -> StepRunner {
        StepRunner {
            orchestrator,
            tasks,
            stop_runs,
            stop_watches,
            live: broadcast::channel(1024).0,
            running: Default::default(),
        }
    }

    fn redactor(&self) -> Result<Redactor, Status> {
        Redactor::for_app(self.orchestrator.app()).map_err(|e| Redactor::unavailable(&e))
    }

    /// Starts the run `r` asks for, or finds the run it already started: (run, whether it started now).
    async fn start(&self, r: pb::RunStepRequest) -> Result<(StepRunRecord, bool), Status> {
        let redactor = self.redactor()?;
        for (field, value) in [("git_remote", &r.git_remote), ("action", &r.action)] {
            if value.is_empty() {
                return Err(required(field));
            }
        }
        let labels = list_filter::labels(&r.labels)?;
        let step_context =
            wire::step_context(&r.step_context_json).map_err(|s| redactor.status(s))?;
        let id = match (r.step_run_id.as_str(), r.request_id.as_str()) {
            ("", "") => uuid::Uuid::new_v4().to_string(),
            ("", request_id) => {
                use sha2::Digest;
                if request_id.len() > 128 || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad_field(
                        "INVALID_REQUEST_ID",
                        "request_id",
                        "request_id must be 1-128 printable ASCII characters without spaces (a UUID is best)",
                    ));
                }
                format!(
                    "req-{}",
                    &hex::encode(sha2::Sha256::digest(request_id.as_bytes()))[..32]
                )
            }
            (id, _) if valid_run_id(id) => id.to_owned(),
            _ => {
                return Err(bad_field(
                    "INVALID_STEP_RUN_ID",
                    "step_run_id",
                    "step_run_id must be 1-63 characters [A-Za-z0-9_.-]",
                ))
            }
        };
        let single = SingleStep {
            git_remote: r.git_remote.clone(),
            git_rev: r.git_rev.clone(),
            action: r.action.clone(),
            step_context,
        };
        // Refusals the policy can make up front answer the call itself.
        self.orchestrator
            .check_single_step(&single)
            .map_err(|e| redactor.status(super::status::status(&e)))?;
        let print = fingerprint(&r);
        let store = &self.orchestrator.app().store;
        let created = store
            .create_step_run(&NewStepRun {
                id: &id,
                owner: self.orchestrator.owner(),
                fingerprint: &print,
                git_remote: &r.git_remote,
                git_rev: &r.git_rev,
                action: &r.action,
                labels: &labels,
            })
            .await
            .map_err(Error::from)?;
        match created {
            Ok(run) => {
                self.spawn(run.id.clone(), single, redactor);
                Ok((run, true))
            }
            Err(existing) if existing.fingerprint == print => Ok((existing, false)),
            Err(_) if r.step_run_id.is_empty() => Err(with_reason(
                Code::InvalidArgument,
                "REQUEST_ID_REUSED",
                format!("request_id {:?} was already used for a different step run: use a new id for a new request", r.request_id),
                &[("request_id", r.request_id.clone())],
                ErrorDetails::with_bad_request_violation("request_id", "already used for a different request"),
            )),
            Err(_) => Err(with_reason(
                Code::AlreadyExists,
                "STEP_RUN_ALREADY_EXISTS",
                format!("step run {id:?} exists and was started with a different request: choose another step_run_id"),
                &[("step_run_id", id.clone())],
                ErrorDetails::new(),
            )),
        }
    }

    /// Runs the step in the background; its events and its end go to the store as they happen.
    fn spawn(&self, id: String, single: SingleStep, redactor: Redactor) {
        let cancel = self.stop_runs.child_token();
        self.running
            .lock()
            .unwrap()
            .insert(id.clone(), cancel.clone());
        let (orchestrator, live, running) = (
            self.orchestrator.clone(),
            self.live.clone(),
            self.running.clone(),
        );
        self.tasks.spawn(async move {
            let store = orchestrator.app().store.clone();
            let started = Instant::now();
            let (events, mut receiver) = tokio::sync::mpsc::channel(1024);
            let forward = {
                let (store, live, id) = (store.clone(), live.clone(), id.clone());
                tokio::spawn(async move {
                    while let Some(event) = receiver.recv().await {
                        match store.append_step_run_event(&id, &event).await {
                            Ok(_) => {
                                let _ = live.send(id.clone());
                            }
                            Err(e) => tracing::error!(step_run_id = %id, error = %e, "storing a step run event failed"),
                        }
                    }
                })
            };
            let outcome = orchestrator
                .run_single_step(&single, events, cancel.clone())
                .await;
            let _ = forward.await;
            let took = started.elapsed();
            let end = match outcome {
                Ok(step) => StepRunEnd {
                    outcome: wire::outcome_of(&step),
                    result: Some(wire::encode_result(&wire::result(&step, took, &redactor))),
                    error: None,
                    duration_ms: took.as_millis() as i64,
                },
                Err(e) => {
                    let status = redactor.status(super::status::status(&e));
                    let reason = super::status::reason(&status);
                    StepRunEnd {
                        outcome: if cancel.is_cancelled() {
                            StepRunOutcome::Cancelled
                        } else {
                            StepRunOutcome::Failed
                        },
                        result: None,
                        error: Some((status.code() as i32, reason, status.message().to_owned())),
                        duration_ms: took.as_millis() as i64,
                    }
                }
            };
            if let Err(e) = store.end_step_run(&id, &end).await {
                tracing::error!(step_run_id = %id, error = %e, "storing a step run's end failed");
            }
            running.lock().unwrap().remove(&id);
            let _ = live.send(id);
        });
    }

    /// The run, ended as failed first if the server that ran it is gone.
    async fn run(&self, id: &str) -> Result<StepRunRecord, Status> {
        if id.is_empty() {
            return Err(required("step_run_id"));
        }
        let store = &self.orchestrator.app().store;
        let run = store.step_run(id).await.map_err(Error::from)?;
        if run.ended || run.owner == self.orchestrator.owner() {
            return Ok(run);
        }
        let leases = store.leases().await.map_err(Error::from)?;
        let host = crate::orchestrator::lease::hostname();
        let now = crate::orchestrator::lease::now_ms();
        if crate::orchestrator::lease::owner_is_dead(&run.owner, &leases, &host, now) {
            let (outcome, reason, message) = if run.cancel_requested {
                (
                    StepRunOutcome::Cancelled,
                    "CANCELLED",
                    "the step run was cancelled; the server running it had stopped",
                )
            } else {
                (
                    StepRunOutcome::Failed,
                    "RUNNER_STOPPED",
                    "the server running the step run stopped before it ended",
                )
            };
            let end = StepRunEnd {
                outcome,
                result: None,
                error: Some((Code::Aborted as i32, reason.into(), message.into())),
                duration_ms: 0,
            };
            store.end_step_run(id, &end).await.map_err(Error::from)?;
            return Ok(store.step_run(id).await.map_err(Error::from)?);
        }
        Ok(run)
    }

    async fn wire_run(&self, run: &StepRunRecord) -> Result<pb::StepRun, Status> {
        let last = self
            .orchestrator
            .app()
            .store
            .step_run_last_seq(&run.id)
            .await
            .map_err(Error::from)?;
        Ok(wire::step_run(run, last))
    }

    /// Streams the run's events after `after_seq`, then live ones, then its result or its error. With
    /// `cancel_on_disconnect`, a receiver that goes away cancels the run.
    async fn follow(
        &self,
        id: &str,
        after_seq: i64,
        cancel_on_disconnect: bool,
    ) -> Result<RunStepStream, Status> {
        if after_seq < 0 {
            return Err(bad_field(
                "INVALID_CURSOR",
                "after_seq",
                "after_seq must be 0 (from the start) or the seq of an event received",
            ));
        }
        let run = self.run(id).await?;
        let store = self.orchestrator.app().store.clone();
        let mut live = self.live.subscribe();
        // Another process serving the same store may run it: its events come with the store's wake-ups.
        let mut stored = store.step_run_signal(id).await;
        let end = store.step_run_last_seq(id).await.map_err(Error::from)?;
        if after_seq > end {
            return Err(with_reason(
                Code::OutOfRange,
                "CURSOR_PAST_END",
                format!("after_seq {after_seq} is past the step run's last event ({end})"),
                &[("last_seq", end.to_string())],
                ErrorDetails::with_bad_request_violation(
                    "after_seq",
                    format!("the run's last event is {end}"),
                ),
            ));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RunStepEvent, Status>>(256);
        let (stop, id) = (self.stop_watches.clone(), run.id.clone());
        let cancel = self.running.lock().unwrap().get(&id).cloned();
        tokio::spawn(async move {
            let mut last = after_seq;
            loop {
                // The state first: if it had ended, all its events are in what is read next.
                let run = match store.step_run(&id).await {
                    Ok(run) => run,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let events = match store.step_run_events_after(&id, last, CATCH_UP).await {
                    Ok(events) => events,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let full = events.len() as i64 == CATCH_UP;
                for stored in &events {
                    last = stored.seq;
                    if let Some(event) = wire::event(&id, stored) {
                        if tx.send(Ok(event)).await.is_err() {
                            if cancel_on_disconnect {
                                if let Some(cancel) = &cancel {
                                    cancel.cancel();
                                }
                            }
                            return;
                        }
                    }
                }
                if full {
                    continue;
                }
                if run.ended {
                    let last_message = match (
                        run.result.as_deref().and_then(wire::decode_result),
                        &run.error,
                    ) {
                        (Some(result), _) => Ok(pb::RunStepEvent {
                            event: Some(pb::run_step_event::Event::Result(result)),
                            step_run_id: id.clone(),
                            seq: 0,
                            at: run.ended_at.clone().unwrap_or_default(),
                        }),
                        (None, Some((code, reason, message))) => Err(with_reason(
                            Code::from_i32(*code),
                            reason,
                            message.clone(),
                            &[("step_run_id", id.clone())],
                            ErrorDetails::new(),
                        )),
                        (None, None) => {
                            Err(Status::internal("the step run ended without a result"))
                        }
                    };
                    let _ = tx.send(last_message).await;
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = tx.send(Err(shutting_down())).await;
                        return;
                    }
                    _ = tx.closed() => {
                        if cancel_on_disconnect {
                            if let Some(cancel) = &cancel {
                                cancel.cancel();
                            }
                        }
                        return;
                    }
                    _ = live.recv() => {}
                    _ = stored.wait() => {}
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl pb::step_runner_service_server::StepRunnerService for StepRunner {
    type RunStepStream = RunStepStream;

    async fn run_step(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<RunStepStream>, Status> {
        let r = request.into_inner();
        let cancel_on_disconnect = r.cancel_on_disconnect;
        let (run, _) = self.start(r).await?;
        Ok(Response::new(
            self.follow(&run.id, 0, cancel_on_disconnect).await?,
        ))
    }

    async fn start_step_run(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<pb::StepRun>, Status> {
        let (run, _) = self.start(request.into_inner()).await?;
        Ok(Response::new(self.wire_run(&run).await?))
    }

    async fn get_step_run(
        &self,
        request: Request<pb::GetStepRunRequest>,
    ) -> Result<Response<pb::StepRun>, Status> {
        let run = self.run(&request.into_inner().step_run_id).await?;
        Ok(Response::new(self.wire_run(&run).await?))
    }

    type WatchStepRunStream = RunStepStream;

    async fn watch_step_run(
        &self,
        request: Request<pb::WatchStepRunRequest>,
    ) -> Result<Response<RunStepStream>, Status> {
        let r = request.into_inner();
        if r.step_run_id.is_empty() {
            return Err(required("step_run_id"));
        }
        Ok(Response::new(
            self.follow(&r.step_run_id, r.after_seq, false).await?,
        ))
    }

    async fn cancel_step_run(
        &self,
        request: Request<pb::CancelStepRunRequest>,
    ) -> Result<Response<pb::StepRun>, Status> {
        let r = request.into_inner();
        let run = self.run(&r.step_run_id).await?;
        if !run.ended {
            let store = &self.orchestrator.app().store;
            store
                .request_step_run_cancel(&run.id)
                .await
                .map_err(Error::from)?;
            if let Some(cancel) = self.running.lock().unwrap().get(&run.id) {
                cancel.cancel();
            }
            let _ = self.live.send(run.id.clone());
        }
        // Re-read: ended meanwhile, or CANCELLING until it has stopped (a dead server's run ends here at once).
        let run = self.run(&r.step_run_id).await?;
        Ok(Response::new(self.wire_run(&run).await?))
    }
}
