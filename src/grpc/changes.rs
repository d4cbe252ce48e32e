//! `ChangeService`: changes created here run in this server process.

use futures::Stream;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::{convert, pb};
use crate::error::Error;
use crate::events::{Event, EventRecord};
use crate::orchestrator::{CreateChange, Orchestrator};
use crate::store::ChangeFilter;

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

fn is_final(record: &EventRecord) -> bool {
    matches!(record.event, Event::ChangeState { state, .. } if state.is_final())
}

#[tonic::async_trait]
impl pb::change_service_server::ChangeService for Changes {
    async fn create_change(
        &self,
        request: Request<pb::CreateChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let r = request.into_inner();
        let change = self
            .orchestrator
            .create_change(&CreateChange {
                project: r.project,
                environment: r.environment,
                git_rev: r.git_rev,
                action: r.action,
            })
            .await?;
        self.start(change.id.clone());
        Ok(Response::new(convert::change(change)))
    }

    async fn get_change(
        &self,
        request: Request<pb::GetChangeRequest>,
    ) -> Result<Response<pb::ChangeDetail>, Status> {
        let id = request.into_inner().id;
        let store = &self.orchestrator.app().store;
        let change = store.change(&id).await.map_err(Error::from)?;
        let steps = store.steps(&id).await.map_err(Error::from)?;
        Ok(Response::new(pb::ChangeDetail {
            change: Some(convert::change(change)),
            steps: steps.into_iter().map(convert::step).collect(),
        }))
    }

    async fn get_step(
        &self,
        request: Request<pb::GetStepRequest>,
    ) -> Result<Response<pb::Step>, Status> {
        let step = self
            .orchestrator
            .app()
            .store
            .step(&request.into_inner().id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(convert::step(step)))
    }

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        let r = request.into_inner();
        let offset: i64 = match r.page_token.as_str() {
            "" => 0,
            token => token.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid page_token {token:?}: pass next_page_token from the previous page"
                ))
            })?,
        };
        let limit = if r.page_size > 0 {
            r.page_size as i64
        } else {
            DEFAULT_PAGE
        };
        let filter = ChangeFilter {
            project: (!r.project.is_empty()).then_some(r.project),
            environment: (!r.environment.is_empty()).then_some(r.environment),
            limit: limit + 1,
            offset,
        };
        let mut changes = self
            .orchestrator
            .app()
            .store
            .list_changes(&filter)
            .await
            .map_err(Error::from)?;
        let next_page_token = if changes.len() as i64 > limit {
            changes.truncate(limit as usize);
            (offset + limit).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListChangesResponse {
            changes: changes.into_iter().map(convert::change).collect(),
            next_page_token,
        }))
    }

    async fn cancel_change(
        &self,
        request: Request<pb::CancelChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let change = self
            .orchestrator
            .cancel_change(&request.into_inner().id)
            .await?;
        Ok(Response::new(convert::change(change)))
    }

    async fn retry_change(
        &self,
        request: Request<pb::RetryChangeRequest>,
    ) -> Result<Response<pb::Change>, Status> {
        let change = self
            .orchestrator
            .prepare_retry(&request.into_inner().id)
            .await?;
        self.start(change.id.clone());
        Ok(Response::new(convert::change(change)))
    }

    type WatchChangeStream = EventStream;

    async fn watch_change(
        &self,
        request: Request<pb::WatchChangeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let store = self.orchestrator.app().store.clone();
        store.change(&r.id).await.map_err(Error::from)?;
        // Subscribe before reading the history, so nothing falls between the two; sequence numbers drop repeats.
        let mut live = self.orchestrator.subscribe();
        let stop = self.stop_watches.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ChangeEvent, Status>>(256);
        tokio::spawn(async move {
            let mut last = r.after_seq;
            // Catches up from the store: the history at first, and whatever a broadcast lag or another process
            // (a CLI run) stored since. Returns true once the final event went out.
            let catch_up = |last: i64| {
                let store = store.clone();
                let id = r.id.clone();
                async move { store.events_after(&id, last).await }
            };
            let send = |record: &EventRecord| tx.send(Ok(convert::change_event(record)));
            let mut done = false;
            crate::orchestrator::crash_point::reached("serve-watching").await;
            while !done {
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
                    done |= is_final(record);
                }
                if r.history_only {
                    return;
                }
                while !done {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        received = live.recv() => match received {
                            Ok(record) if record.change_id == r.id => {
                                if record.seq == last + 1 {
                                    if send(&record).await.is_err() { return; }
                                    last = record.seq;
                                    done = is_final(&record);
                                } else if record.seq > last + 1 {
                                    break; // a gap: fill it from the store
                                }
                            }
                            Ok(_) => {}
                            Err(RecvError::Lagged(_)) => break,
                            Err(RecvError::Closed) => return,
                        },
                        // Events stored by another process are not broadcast here.
                        _ = tokio::time::sleep(Duration::from_millis(500)) => break,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
