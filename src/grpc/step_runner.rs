//! `StepRunnerService.RunStep`: one step in one discarded container for a scheduler with its own change model.

use futures::Stream;
use std::pin::Pin;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::redact::Redactor;
use super::{convert, pb};
use crate::error::Error;
use crate::orchestrator::{Orchestrator, SingleStep};

pub struct StepRunner {
    pub orchestrator: Orchestrator,
    /// Running steps, so shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// Cancels running steps when the server's grace period is over.
    pub stop_runs: CancellationToken,
}

type RunStepStream = Pin<Box<dyn Stream<Item = Result<pb::RunStepEvent, Status>> + Send>>;

fn as_run_step_event(event: pb::change_event::Event) -> Option<pb::run_step_event::Event> {
    use pb::change_event::Event as C;
    use pb::run_step_event::Event as R;
    match event {
        C::Phase(p) => Some(R::Phase(p)),
        C::Build(b) => Some(R::Build(b)),
        C::Log(l) => Some(R::Log(l)),
        C::ChangeState(_) | C::StepState(_) => None,
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
        // Nothing answered here carries a secret value, whatever the step printed or returned.
        let redactor =
            Redactor::for_app(self.orchestrator.app()).map_err(|e| Redactor::unavailable(&e))?;
        let step_context = match r.step_context_json.trim() {
            "" => serde_json::json!({}),
            text => crate::properties::parse_document("step_context_json", text)
                .map_err(|e| redactor.status(Error::from(e).into()))?,
        };
        let single = SingleStep {
            git_remote: r.git_remote,
            git_rev: r.git_rev,
            action: r.action,
            step_context,
        };
        // Refusals the policy can make up front answer the call itself, not its stream.
        self.orchestrator
            .check_single_step(&single)
            .map_err(|e| redactor.status(super::status::status(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RunStepEvent, Status>>(256);
        let (orchestrator, cancel) = (self.orchestrator.clone(), self.stop_runs.child_token());
        self.tasks.spawn(async move {
            let (events, mut receiver) = tokio::sync::mpsc::channel(1024);
            let forward = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(event) = receiver.recv().await {
                        if let Some(event) = as_run_step_event(convert::event(&event)) {
                            let _ = tx.send(Ok(pb::RunStepEvent { event: Some(event) })).await;
                        }
                    }
                })
            };
            // A caller that hangs up cancels its step.
            let closed = {
                let (tx, cancel) = (tx.clone(), cancel.clone());
                tokio::spawn(async move {
                    tx.closed().await;
                    cancel.cancel();
                })
            };
            let outcome = orchestrator.run_single_step(&single, events, cancel).await;
            let _ = forward.await;
            closed.abort();
            let message = outcome
                .map(|o| pb::RunStepEvent {
                    event: Some(pb::run_step_event::Event::Result(pb::RunStepResult {
                        exit_code: o.exit_code,
                        git_sha: o.git_sha,
                        image: o.image,
                        image_cached: o.image_cached,
                        step_result_json: o
                            .result
                            .map(|r| redactor.json(&r).to_string())
                            .unwrap_or_default(),
                    })),
                })
                .map_err(|e| redactor.status(super::status::status(&e)));
            let _ = tx.send(message).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
