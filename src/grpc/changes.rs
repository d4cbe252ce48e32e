//! `ChangeService`: changes created here run in this server process.

use futures::Stream;
use std::pin::Pin;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::status::{bad_field, required, shutting_down, with_reason};
use super::{convert, idempotency, list_filter, pb};
use crate::error::Error;
use crate::events::{Event, EventRecord};
use crate::orchestrator::{CreateChange, Orchestrator};
use crate::store::{Change, ChangeQuery, Keyset, Woke};

pub struct Changes {
    pub orchestrator: Orchestrator,
    /// Running changes, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Cancels running changes when the shutdown grace period is over.
    pub stop_runs: CancellationToken,
    /// Ends watch streams at shutdown.
    pub stop_watches: CancellationToken,
}

impl Changes {
    fn start(&self, id: String) {
        let (orchestrator, cancel) = (self.orchestrator.clone(), self.stop_runs.child_token());
        self.tasks.spawn(async move {
            if let Err(e) = orchestrator.run_change(&id, cancel).await {
                tracing::error!(change_id = %id, error = %e, "change run failed");
            }
        });
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChangeEvent, Status>> + Send>>;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 1000;

/// Changes on the wire, with their labels.
async fn with_labels(
    orchestrator: &Orchestrator,
    changes: Vec<Change>,
) -> Result<Vec<pb::Change>, Status> {
    let ids: Vec<String> = changes.iter().map(|c| c.id.clone()).collect();
    let mut labels = orchestrator
        .app()
        .store
        .change_labels(&ids)
        .await
        .map_err(Error::from)?;
    Ok(changes
        .into_iter()
        .map(|c| {
            let own = labels.remove(&c.id).unwrap_or_default();
            let mut change = convert::change(c);
            change.labels = own.into_iter().collect();
            change
        })
        .collect())
}

async fn one_with_labels(
    orchestrator: &Orchestrator,
    change: Change,
) -> Result<pb::Change, Status> {
    Ok(with_labels(orchestrator, vec![change]).await?.remove(0))
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(required("id"));
    }
    Ok(())
}

/// An attempt asked for: 0 (the current one) or a positive number.
fn require_attempt(attempt: i64) -> Result<(), Status> {
    if attempt < 0 {
        return Err(bad_field(
            "INVALID_ATTEMPT",
            "attempt",
            "attempt must be 0 (the current attempt) or an attempt's number (1, 2, …)",
        ));
    }
    Ok(())
}

/// How long a watch of an ended change waits for its final event before it gives up on it.
const END_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn is_final(record: &EventRecord) -> bool {
    matches!(record.event, Event::ChangeState { state, .. } if state.is_final())
}

#[tonic::async_trait]
impl pb::change_service_server::ChangeService for Changes {
    async fn create_change(
        &self,
        request: Request<pb::CreateChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let mut r = request.into_inner();
        for (field, value) in [
            ("project", &r.project),
            ("environment", &r.environment),
            ("action", &r.action),
        ] {
            if value.is_empty() {
                return Err(required(field));
            }
        }
        let labels = list_filter::labels(&r.labels)?;
        let request_id = std::mem::take(&mut r.request_id);
        let store = self.orchestrator.app().store.clone();
        let (change, started) =
            idempotency::once(&store, "CreateChange", request_id, &r, || async {
                let change = self
                    .orchestrator
                    .create_labelled_change(
                        &CreateChange {
                            project: r.project.clone(),
                            environment: r.environment.clone(),
                            git_rev: r.git_rev.clone(),
                            action: r.action.clone(),
                        },
                        &labels,
                    )
                    .await?;
                one_with_labels(&self.orchestrator, change).await
            })
            .await?;
        if started {
            self.start(change.id.clone());
        }
        Ok(Response::new(change))
    }

    async fn get_change(
        &self,
        request: Request<pb::GetChangeRequest>,
    ) -> Result<Response<pb::ChangeDetail>, Status> {
        let r = request.into_inner();
        let id = r.id;
        require_id(&id)?;
        require_attempt(r.attempt)?;
        let store = &self.orchestrator.app().store;
        let attempts = store.change(&id).await.map_err(Error::from)?.attempt;
        let change = store
            .change_in_attempt(&id, r.attempt)
            .await
            .map_err(Error::from)?;
        let steps = store
            .steps_in_attempt(&id, r.attempt)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ChangeDetail {
            change: Some(one_with_labels(&self.orchestrator, change).await?),
            steps: steps.into_iter().map(convert::step).collect(),
            attempts,
        }))
    }

    async fn get_step(
        &self,
        request: Request<pb::GetStepRequest>,
    ) -> Result<Response<pb::Step>, Status> {
        let r = request.into_inner();
        let id = r.id;
        require_id(&id)?;
        require_attempt(r.attempt)?;
        let step = self
            .orchestrator
            .app()
            .store
            .step_in_attempt(&id, r.attempt)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(convert::step(step)))
    }

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 => {
                return Err(bad_field(
                    "INVALID_PAGE_SIZE",
                    "page_size",
                    "page_size must not be negative",
                ))
            }
            n => (n as i64).min(MAX_PAGE),
        };
        let mut query = ChangeQuery {
            project: (!r.project.is_empty()).then_some(r.project),
            environment: (!r.environment.is_empty()).then_some(r.environment),
            ..Default::default()
        };
        list_filter::parse_filter(&r.filter, &mut query)?;
        list_filter::parse_order_by(&r.order_by, &mut query)?;
        let after = list_filter::parse_page_token(&r.page_token, &query)?;
        let mut changes = self
            .orchestrator
            .app()
            .store
            .query_changes(&query, after.as_ref(), limit + 1)
            .await
            .map_err(Error::from)?;
        let next_page_token = if changes.len() as i64 > limit {
            changes.truncate(limit as usize);
            let last = changes.last().expect("a full page");
            list_filter::page_token(
                &query,
                &Keyset {
                    created_at: last.created_at.clone(),
                    id: last.id.clone(),
                },
            )
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListChangesResponse {
            changes: with_labels(&self.orchestrator, changes).await?,
            next_page_token,
        }))
    }

    async fn cancel_change(
        &self,
        request: Request<pb::CancelChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let mut r = request.into_inner();
        require_id(&r.id)?;
        let request_id = std::mem::take(&mut r.request_id);
        let store = self.orchestrator.app().store.clone();
        let (change, _) = idempotency::once(&store, "CancelChange", request_id, &r, || async {
            let change = self.orchestrator.cancel_change(&r.id).await?;
            one_with_labels(&self.orchestrator, change).await
        })
        .await?;
        Ok(Response::new(change))
    }

    async fn retry_change(
        &self,
        request: Request<pb::RetryChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let mut r = request.into_inner();
        require_id(&r.id)?;
        let request_id = std::mem::take(&mut r.request_id);
        let store = self.orchestrator.app().store.clone();
        let (change, started) =
            idempotency::once(&store, "RetryChange", request_id, &r, || async {
                let change = self.orchestrator.prepare_retry(&r.id).await?;
                one_with_labels(&self.orchestrator, change).await
            })
            .await?;
        if started {
            self.start(change.id.clone());
        }
        Ok(Response::new(change))
    }

    async fn get_actions(
        &self,
        request: Request<pb::GetActionsRequest>,
    ) -> Result<Response<pb::GetActionsResponse>, Status> {
        use pb::get_actions_request::Source;
        let r = request.into_inner();
        let (project, remote) = match &r.source {
            Some(Source::Project(p)) if !p.is_empty() => (Some(p.as_str()), None),
            Some(Source::GitRemote(g)) if !g.is_empty() => (None, Some(g.as_str())),
            _ => return Err(required("project or git_remote")),
        };
        let found = self
            .orchestrator
            .commit_actions(project, remote, &r.git_rev)
            .await?;
        let actions = found
            .manifest
            .actions
            .iter()
            .map(|(name, action)| pb::Action {
                name: name.clone(),
                description: action.description.clone().unwrap_or_default(),
                runs_command: action.run.is_some(),
                steps: action.steps.clone(),
                run_as: match action.run_as {
                    crate::actions::RunAs::Sequential => pb::ChildrenStrategy::Sequential,
                    crate::actions::RunAs::Parallel => pb::ChildrenStrategy::Parallel,
                } as i32,
                timeout: action.timeout.map(super::step_run_wire::duration),
            })
            .collect();
        Ok(Response::new(pb::GetActionsResponse {
            git_sha: found.git_sha,
            manifest_path: found.path,
            actions,
        }))
    }

    type WatchChangeStream = EventStream;

    async fn watch_change(
        &self,
        request: Request<pb::WatchChangeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        require_id(&r.id)?;
        if r.after_seq < 0 {
            return Err(bad_field(
                "INVALID_CURSOR",
                "after_seq",
                "after_seq must be 0 (from the start) or the seq of an event received",
            ));
        }
        let store = self.orchestrator.app().store.clone();
        store.change(&r.id).await.map_err(Error::from)?;
        // Subscribe before reading the history, so nothing falls between the two; sequence numbers drop repeats.
        // `live` carries what this process stores; `stored` says another process (a worker on any host) stored
        // something (see store::wakeups).
        let mut live = self.orchestrator.subscribe();
        let mut stored = store.change_signal(&r.id).await;
        let end = store.last_seq(&r.id).await.map_err(Error::from)?;
        if r.after_seq > end {
            return Err(with_reason(
                tonic::Code::OutOfRange,
                "CURSOR_PAST_END",
                format!(
                    "after_seq {} is past the change's last event ({end})",
                    r.after_seq
                ),
                &[("last_seq", end.to_string())],
                tonic_types::ErrorDetails::with_bad_request_violation(
                    "after_seq",
                    format!("the change's last event is {end}"),
                ),
            ));
        }
        let stop = self.stop_watches.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ChangeEvent, Status>>(256);
        tokio::spawn(async move {
            let mut last = r.after_seq;
            // Catches up from the store: the history at first, and whatever a broadcast lag or another process
            // (a CLI run) stored since.
            let catch_up = |last: i64| {
                let store = store.clone();
                let id = r.id.clone();
                async move { store.events_after(&id, last).await }
            };
            // Whether the change has ended (then nothing more will be stored after what is there now), and its
            // current attempt: only that attempt's end ends the watch (an earlier attempt's end was retried).
            let finished = || {
                let store = store.clone();
                let id = r.id.clone();
                async move {
                    store
                        .change(&id)
                        .await
                        .map(|c| (c.state.is_final(), c.attempt))
                }
            };
            let send = |record: &EventRecord| tx.send(Ok(convert::change_event(record)));
            let (mut done, mut quiet) = (false, false);
            crate::orchestrator::crash_point::reached("serve-watching").await;
            while !done {
                // Read the state first: if it was final, everything it stored is in what is read next.
                let (ended, attempt) = match finished().await {
                    Ok(now) => now,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let records = match catch_up(last).await {
                    Ok(records) => records,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                for record in &records {
                    if send(record).await.is_err() {
                        return;
                    }
                    last = record.seq;
                    done |= is_final(record) && record.attempt >= attempt;
                }
                if ended && !done && records.is_empty() && last > 0 {
                    // A watcher resuming after the end: the event it has last is the end.
                    done = matches!(
                        store.events_between(&r.id, last - 1, Some(last)).await.as_deref(),
                        Ok([end]) if is_final(end) && end.attempt >= attempt
                    );
                }
                if r.history_only || done || ended && quiet && records.is_empty() {
                    return;
                }
                // A change's final state is stored before the events that go with it (its runner's recorder
                // stores them after): once it has ended, the watch waits for its final event, or until the store
                // stayed quiet for a while (a runner that died in between never stores it).
                let wait = if ended {
                    stored.fallback().min(END_GRACE)
                } else {
                    stored.fallback()
                };
                let mut woke = Woke::Notified;
                while !done {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = tx.send(Err(shutting_down())).await;
                            return;
                        }
                        received = live.recv() => match received {
                            Ok(record) if record.change_id == r.id => {
                                if record.seq == last + 1 {
                                    if send(&record).await.is_err() { return; }
                                    last = record.seq;
                                    done = is_final(&record) && record.attempt >= attempt;
                                } else if record.seq > last + 1 {
                                    break; // a gap: fill it from the store
                                }
                            }
                            Ok(_) => {}
                            Err(RecvError::Lagged(_)) => break,
                            Err(RecvError::Closed) => {
                                let _ = tx.send(Err(shutting_down())).await;
                                return;
                            }
                        },
                        // Events stored by another process are not broadcast here: read them from the store.
                        w = stored.wait_at_most(wait) => {
                            woke = w;
                            // What this process stored `live` has delivered already: nothing to read then.
                            if w == Woke::Notified
                                && !ended
                                && matches!(store.last_seq(&r.id).await, Ok(seq) if seq <= last)
                            {
                                continue;
                            }
                            break;
                        }
                    }
                }
                quiet = woke == Woke::Fallback;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
