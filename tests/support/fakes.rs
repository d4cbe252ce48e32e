//! Fakes of the orchestrator's seams (sources, images, executor), for tests that need no git repository and no
//! daemon. Test support only: the product library ships no fake.
#![allow(dead_code)]

use futures::future::BoxFuture;
use futures::FutureExt;
use runner::executor::{
    Ended, Executor, ExecutorError, LeftOver, LogLine, StepOutcome, StepRun, Stream,
};
use runner::orchestrator::{
    EventTx, ImageRequest, PreparedImage, ServiceImageRequest, Sources, StepImages,
};
use runner::store::Project;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

/// Serves one manifest (and repository properties) for every revision; `rev` resolves to "sha-<rev>".
pub struct FakeSources {
    pub manifest: Value,
    pub properties: Value,
}

impl Sources for FakeSources {
    fn resolve<'a>(
        &'a self,
        _: &'a Project,
        rev: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<String>> {
        async move { Ok(format!("sha-{rev}")) }.boxed()
    }
    fn read_file<'a>(
        &'a self,
        _: &'a Project,
        _: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<Option<Vec<u8>>>> {
        let found =
            (path == ".opschain/actions.json").then(|| self.manifest.to_string().into_bytes());
        async move { Ok(found) }.boxed()
    }
    fn repository_properties<'a>(
        &'a self,
        _: &'a Project,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<Value>> {
        async move { Ok(self.properties.clone()) }.boxed()
    }
}

/// Names images after what they are for; a service build whose Dockerfile path contains "missing" fails.
pub struct FakeImages;

impl StepImages for FakeImages {
    fn prepare<'a>(
        &'a self,
        request: ImageRequest<'a>,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        let image = format!("fake:{}", request.identity.action);
        async move {
            Ok(PreparedImage {
                image,
                cached: false,
            })
        }
        .boxed()
    }

    fn prepare_service<'a>(
        &'a self,
        request: ServiceImageRequest<'a>,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        let dockerfile = request.build.dockerfile().to_owned();
        let image = format!("fake-service:{}", request.service);
        async move {
            if dockerfile.contains("missing") {
                return Err(runner::error::Error::Build {
                    message: format!("{dockerfile} does not exist"),
                });
            }
            Ok(PreparedImage {
                image,
                cached: false,
            })
        }
        .boxed()
    }

    fn prepare_docker_daemon<'a>(
        &'a self,
        _: &'a str,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        async move {
            Ok(PreparedImage {
                image: "fake-dind".into(),
                cached: true,
            })
        }
        .boxed()
    }
}

/// What the fake does for one action.
#[derive(Debug, Clone, Default)]
pub struct Script {
    pub exit_code: i64,
    /// Whole lines, on stdout.
    pub output: Vec<String>,
    /// Then raw pieces of output, exactly as given (a line may span pieces).
    pub raw: Vec<(Stream, Vec<u8>)>,
    pub result: Option<Value>,
    pub delay: Duration,
}

impl Script {
    /// Prints nothing and exits 0 after `delay` (unless cancelled or timed out first).
    pub fn sleeping(delay: Duration) -> Script {
        Script {
            delay,
            ..Default::default()
        }
    }
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
        logs: Sender<LogLine>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StepOutcome, ExecutorError>> {
        async move {
            self.runs.lock().unwrap().push(run.clone());
            let action = run.step_context["context"]["step"]["action"].as_str().unwrap_or_default();
            let script = self.scripts.get(action).cloned().unwrap_or_default();
            for line in &script.output {
                let _ = logs.send(LogLine::line(Stream::Stdout, line)).await;
            }
            for (stream, bytes) in &script.raw {
                let _ = logs
                    .send(LogLine {
                        stream: *stream,
                        bytes: bytes.clone(),
                    })
                    .await;
            }
            let deadline = run.timeout.unwrap_or(Duration::MAX);
            tokio::select! {
                _ = tokio::time::sleep(script.delay.min(deadline)) => {}
                _ = cancel.cancelled() => {
                    return Ok(StepOutcome { ended: Ended::Cancelled, exit_code: 143, result: None, limit: None });
                }
            }
            if script.delay > deadline {
                return Ok(StepOutcome { ended: Ended::TimedOut, exit_code: 143, result: None, limit: None });
            }
            Ok(StepOutcome {
                ended: Ended::Exited,
                exit_code: script.exit_code,
                result: script.result,
                limit: None,
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
