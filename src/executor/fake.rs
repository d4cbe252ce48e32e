//! A scripted executor for orchestration tests: each action name maps to what its "container" prints and leaves.

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::{Ended, Executor, ExecutorError, LeftOver, LogLine, StepOutcome, StepRun, Stream};

/// What the fake does for one action.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub exit_code: i64,
    pub output: Vec<String>,
    pub result: Option<Value>,
    pub delay: Duration,
}

/// Runs no container: looks the step's action up (`step_context.context.step.action`) in its scripts.
#[derive(Debug, Default)]
pub struct FakeExecutor {
    pub scripts: HashMap<String, Script>,
    /// Every run, in start order, for assertions.
    pub runs: Mutex<Vec<StepRun>>,
}

impl Executor for FakeExecutor {
    fn run_step<'a>(
        &'a self,
        run: &'a StepRun,
        logs: UnboundedSender<LogLine>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StepOutcome, ExecutorError>> {
        async move {
            self.runs.lock().unwrap().push(run.clone());
            let action = run.step_context["context"]["step"]["action"].as_str().unwrap_or_default();
            let script = self.scripts.get(action).cloned().unwrap_or_default();
            for line in &script.output {
                let _ = logs.send(LogLine {
                    stream: Stream::Stdout,
                    line: line.clone(),
                });
            }
            let deadline = run.timeout.unwrap_or(Duration::MAX);
            tokio::select! {
                _ = tokio::time::sleep(script.delay.min(deadline)) => {}
                _ = cancel.cancelled() => {
                    return Ok(StepOutcome { ended: Ended::Cancelled, exit_code: 143, result: None });
                }
            }
            if script.delay > deadline {
                return Ok(StepOutcome { ended: Ended::TimedOut, exit_code: 143, result: None });
            }
            Ok(StepOutcome {
                ended: Ended::Exited,
                exit_code: script.exit_code,
                result: script.result,
            })
        }
        .boxed()
    }

    fn left_overs(&self) -> BoxFuture<'_, Result<Vec<LeftOver>, ExecutorError>> {
        async { Ok(vec![]) }.boxed()
    }

    fn remove<'a>(&'a self, _: &'a LeftOver) -> BoxFuture<'a, Result<(), ExecutorError>> {
        async { Ok(()) }.boxed()
    }
}
