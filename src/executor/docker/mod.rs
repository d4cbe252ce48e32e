//! The Docker backend: the thin layer that sends [`spec`]'s conversions to the daemon.

mod services;
pub mod spec;

use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, DownloadFromContainerOptions,
    KillContainerOptions, ListContainersOptions, RemoveContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::{
    Ended, Executor, ExecutorError, LeftOver, LeftOverKind, LogLine, StepOutcome, StepRun, Stream,
    LABEL_CHANGE, LABEL_OWNER, LABEL_STEP, LABEL_STORE, STEP_RESULT_PATH,
};

/// Runs steps as containers of the local Docker Engine.
#[derive(Clone, Debug)]
pub struct DockerExecutor {
    docker: Docker,
    /// The daemon's socket on this host, for steps with `docker: socket`.
    socket: String,
}

/// Connects to the daemon named by `DOCKER_HOST` (default the local socket) at the API version it speaks.
pub async fn connect() -> Result<Docker, ExecutorError> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| ExecutorError::Unavailable(e.to_string()))?;
    docker.negotiate_version().await.map_err(|e| {
        ExecutorError::Unavailable(format!("{e} (is dockerd running? see tools/setup.sh)"))
    })
}

/// A client of the daemon at the unix socket `path`, which need not exist yet (bollard's own unix client refuses a
/// missing socket): every request connects anew, so a daemon that starts later is found, and one that stops is
/// noticed at the next request.
pub fn unix_client(path: &str) -> Result<Docker, ExecutorError> {
    let path = std::path::PathBuf::from(path);
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        Box::pin(async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(hyper_util::rt::TokioIo::new)
        })
    });
    let mut builder =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.pool_max_idle_per_host(0);
    let client = std::sync::Arc::new(builder.build(connector));
    Docker::connect_with_custom_transport(
        move |request: bollard::BollardRequest| {
            let client = client.clone();
            async move {
                client
                    .request(request)
                    .await
                    .map_err(bollard::errors::Error::from)
            }
        },
        Some("http://docker"),
        120,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| ExecutorError::Unavailable(e.to_string()))
}

impl DockerExecutor {
    pub fn new(docker: Docker) -> DockerExecutor {
        let socket = crate::buildkit::DockerEndpoint::from_env()
            .socket
            .to_string_lossy()
            .into_owned();
        DockerExecutor { docker, socket }
    }

    pub async fn connect() -> Result<DockerExecutor, ExecutorError> {
        Ok(DockerExecutor::new(connect().await?))
    }

    fn failed(
        run: &StepRun,
        action: &'static str,
    ) -> impl FnOnce(bollard::errors::Error) -> ExecutorError {
        let step_id = run.step_id.clone();
        move |e| ExecutorError::Container {
            action,
            step_id,
            message: e.to_string(),
        }
    }

    /// Attaches to and starts the step container, hands its agent the envelope once `ready` (the services) says
    /// so, and waits for it to end, its timeout or a cancel.
    async fn run_in(
        &self,
        id: &str,
        run: &StepRun,
        ready: impl std::future::Future<Output = Result<(), ExecutorError>>,
        logs: Sender<LogLine>,
        cancel: CancellationToken,
    ) -> Result<StepOutcome, ExecutorError> {
        let docker = &self.docker;
        let attached = docker
            .attach_container(
                id,
                Some(AttachContainerOptions {
                    stream: true,
                    stdin: true,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(Self::failed(run, "attach to"))?;
        docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(Self::failed(run, "start"))?;
        crate::orchestrator::crash_point::reached("running").await;

        let mut input = attached.input;
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let envelope = spec::stdin_envelope(run, &marker);
        let feed_envelope = async move {
            ready.await?;
            // A step that exits before reading stdin closes it under us: that is not an error of ours.
            let _ = input.write_all(&envelope).await;
            let _ = input.shutdown().await;
            Ok::<_, ExecutorError>(())
        };
        let result_slot = std::sync::Mutex::new(None);
        let forward_output = forward_lines(attached.output, logs, &marker, &result_slot);
        let wait = async {
            let mut waits = docker.wait_container(id, None::<WaitContainerOptions>);
            match waits.next().await {
                Some(Ok(done)) => Ok(done.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(Self::failed(run, "wait for")(e)),
                None => Ok(-1),
            }
        };
        let deadline = async {
            match run.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };

        let (exit_code, ended) = {
            let work = async {
                let ended = async { tokio::join!(forward_output, wait).1 };
                tokio::pin!(ended);
                tokio::select! {
                    // Services that never got ready fail the step (the caller removes the waiting container).
                    fed = feed_envelope => {
                        fed?;
                        ended.await
                    }
                    // Stopped before it was fed (a cancel or timeout while the services got ready).
                    code = &mut ended => code,
                }
            };
            tokio::pin!(work);
            tokio::select! {
                code = &mut work => (code?, Ended::Exited),
                _ = deadline => (self.stop(id, run, &mut work).await?, Ended::TimedOut),
                _ = cancel.cancelled() => (self.stop(id, run, &mut work).await?, Ended::Cancelled),
            }
        };

        let result = match result_slot.into_inner().expect("no poisoning") {
            Some(Ok(result)) => Some(result),
            Some(Err(message)) => {
                return Err(ExecutorError::BadResult {
                    step_id: run.step_id.clone(),
                    message,
                })
            }
            // No result line (the agent was killed, or an image without our agent): read the file itself.
            None => self.step_result(id, run).await?,
        };
        let oom_killed = docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        let limit = spec::limit_hit(oom_killed, result.as_ref(), run.resources.as_ref());
        Ok(StepOutcome {
            ended,
            exit_code,
            result,
            limit,
        })
    }

    /// SIGTERM, then SIGKILL once the grace period is over; returns the exit code.
    async fn stop<F>(
        &self,
        id: &str,
        run: &StepRun,
        work: &mut std::pin::Pin<&mut F>,
    ) -> Result<i64, ExecutorError>
    where
        F: std::future::Future<Output = Result<i64, ExecutorError>>,
    {
        let kill = |signal: &str| {
            self.docker.kill_container(
                id,
                Some(KillContainerOptions {
                    signal: signal.to_owned(),
                }),
            )
        };
        let _ = kill("SIGTERM").await;
        crate::orchestrator::crash_point::reached("cancelling").await;
        tokio::select! {
            code = work.as_mut() => code,
            _ = tokio::time::sleep(run.stop_grace) => {
                let _ = kill("SIGKILL").await;
                work.as_mut().await
            }
        }
    }

    async fn step_result(
        &self,
        id: &str,
        run: &StepRun,
    ) -> Result<Option<serde_json::Value>, ExecutorError> {
        let mut archive = Vec::new();
        let mut chunks = self.docker.download_from_container(
            id,
            Some(DownloadFromContainerOptions {
                path: STEP_RESULT_PATH.to_owned(),
            }),
        );
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(bytes) => archive.extend_from_slice(&bytes),
                // No step_result.json (e.g. the action killed the agent): the step simply left no result.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                Err(e) => return Err(Self::failed(run, "read step_result.json from")(e)),
            }
        }
        spec::result_from_tar(&archive).map_err(|message| ExecutorError::BadResult {
            step_id: run.step_id.clone(),
            message,
        })
    }

    async fn remove_container(&self, id: &str) -> Result<(), bollard::errors::Error> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        gone(self.docker.remove_container(id, Some(options)).await)
    }
}

/// A removal that found nothing to remove (404), or the thing already being removed (409), did its job.
fn gone(result: Result<(), bollard::errors::Error>) -> Result<(), bollard::errors::Error> {
    match result {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => Ok(()),
        other => other,
    }
}

/// Stderr kept in memory while it may still be the result line (which the agent prints last, on stderr).
const RESULT_LINE_MAX: usize = 64 * 1024 * 1024;

/// Passes the multiplexed output on as it comes: stdout as is; stderr by lines, so the agent's result line (with
/// this run's marker) is taken out and never logged.
async fn forward_lines(
    mut output: std::pin::Pin<
        Box<
            dyn futures::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
    logs: Sender<LogLine>,
    marker: &str,
    result: &std::sync::Mutex<Option<Result<serde_json::Value, String>>>,
) {
    use bollard::container::LogOutput;
    let prefix = format!("[opschain-result {marker}] ");
    let mut stderr: Vec<u8> = Vec::new();
    // Whether the stderr buffer holds the start of a line (so it may be the result line).
    let mut at_line_start = true;
    let take_result = |line: &[u8]| -> bool {
        let text = String::from_utf8_lossy(line);
        match spec::result_line(text.trim_end_matches('\r'), marker) {
            Some(parsed) => {
                *result.lock().expect("no poisoning") = Some(parsed);
                true
            }
            None => false,
        }
    };
    let send = |stream: Stream, bytes: Vec<u8>| {
        let logs = logs.clone();
        async move { logs.send(LogLine { stream, bytes }).await.is_ok() }
    };
    while let Some(Ok(chunk)) = output.next().await {
        let (stream, message) = match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                (Stream::Stdout, message)
            }
            LogOutput::StdErr { message } => (Stream::Stderr, message),
            LogOutput::StdIn { .. } => continue,
        };
        if stream == Stream::Stdout {
            send(stream, message.to_vec()).await;
            continue;
        }
        stderr.extend_from_slice(&message);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(n) = stderr[start..].iter().position(|b| *b == b'\n') {
            let line = &stderr[start..start + n + 1];
            if !(at_line_start && line.starts_with(prefix.as_bytes()) && take_result(&line[..n])) {
                out.extend_from_slice(line);
            }
            at_line_start = true;
            start += n + 1;
        }
        stderr.drain(..start);
        // An unfinished line goes on now unless it may be the result line (which waits for its end, up to a
        // bound).
        if !stderr.is_empty() {
            let maybe_result = at_line_start
                && (prefix.as_bytes().starts_with(&stderr)
                    || stderr.starts_with(prefix.as_bytes()));
            if !maybe_result || stderr.len() > RESULT_LINE_MAX {
                out.append(&mut stderr);
                at_line_start = false;
            }
        }
        if !out.is_empty() {
            send(stream, out).await;
        }
    }
    let is_result = at_line_start && take_result(&stderr);
    if !stderr.is_empty() && !is_result {
        send(Stream::Stderr, stderr).await;
    }
}

impl Executor for DockerExecutor {
    fn run_step<'a>(
        &'a self,
        run: &'a StepRun,
        logs: Sender<LogLine>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<StepOutcome, ExecutorError>> {
        async move {
            let with_services = spec::needs_network(run);
            let outcome = async {
                if with_services {
                    services::start(&self.docker, run).await?;
                }
                let created = self
                    .docker
                    .create_container(
                        Some(CreateContainerOptions {
                            name: Some(spec::container_name(run)),
                            ..Default::default()
                        }),
                        spec::container_body(run, &self.socket),
                    )
                    .await
                    .map_err(Self::failed(run, "create"))?;
                // Started while the services get ready (its agent waits for the envelope on stdin), so the step
                // runs as soon as they are; the wait obeys the step's timeout and cancel like the step itself.
                let ready = async {
                    match with_services {
                        true => services::ready(&self.docker, run).await,
                        false => Ok(()),
                    }
                };
                let outcome = self
                    .run_in(&created.id, run, ready, logs.clone(), cancel)
                    .await;
                // Removed whatever happened above; a removal failure only matters if the step itself went well.
                let removed = self.remove_container(&created.id).await;
                let outcome = outcome?;
                removed.map_err(Self::failed(run, "remove"))?;
                Ok(outcome)
            }
            .await;
            // Services and their network go on every path too, after the step container.
            let torn_down = match with_services {
                true => services::stop(&self.docker, run, &logs).await,
                false => Ok(()),
            };
            let outcome = outcome?;
            torn_down?;
            Ok(outcome)
        }
        .boxed()
    }

    /// Asks the daemon for its version, which also settles the API version every clone of this client speaks
    /// (a server started before its daemon learns it here).
    fn available(&self) -> BoxFuture<'_, Result<(), ExecutorError>> {
        async move {
            self.docker
                .clone()
                .negotiate_version()
                .await
                .map(|_| ())
                .map_err(|e| ExecutorError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn left_overs(&self) -> BoxFuture<'_, Result<Vec<LeftOver>, ExecutorError>> {
        async move {
            let containers = self
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(HashMap::from([(
                        "label".to_owned(),
                        vec![LABEL_OWNER.to_owned()],
                    )])),
                    ..Default::default()
                }))
                .await
                .map_err(|e| ExecutorError::Unavailable(e.to_string()))?;
            let mut found: Vec<LeftOver> = containers
                .into_iter()
                .filter_map(|c| {
                    let labels = c.labels.unwrap_or_default();
                    Some(LeftOver {
                        kind: LeftOverKind::Container,
                        id: c.id?,
                        owner: labels.get(LABEL_OWNER).cloned().unwrap_or_default(),
                        store: labels.get(LABEL_STORE).cloned().unwrap_or_default(),
                        change_id: labels.get(LABEL_CHANGE).cloned().unwrap_or_default(),
                        step_id: labels.get(LABEL_STEP).cloned().unwrap_or_default(),
                    })
                })
                .collect();
            let networks = self
                .docker
                .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                    filters: Some(HashMap::from([(
                        "label".to_owned(),
                        vec![LABEL_OWNER.to_owned()],
                    )])),
                }))
                .await
                .map_err(|e| ExecutorError::Unavailable(e.to_string()))?;
            found.extend(networks.into_iter().filter_map(|n| {
                let labels = n.labels.unwrap_or_default();
                Some(LeftOver {
                    kind: LeftOverKind::Network,
                    id: n.id?,
                    owner: labels.get(LABEL_OWNER).cloned().unwrap_or_default(),
                    store: labels.get(LABEL_STORE).cloned().unwrap_or_default(),
                    change_id: labels.get(LABEL_CHANGE).cloned().unwrap_or_default(),
                    step_id: labels.get(LABEL_STEP).cloned().unwrap_or_default(),
                })
            }));
            let volumes = self
                .docker
                .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                    filters: Some(HashMap::from([(
                        "label".to_owned(),
                        vec![LABEL_OWNER.to_owned()],
                    )])),
                }))
                .await
                .map_err(|e| ExecutorError::Unavailable(e.to_string()))?;
            found.extend(
                volumes
                    .volumes
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| LeftOver {
                        kind: LeftOverKind::Volume,
                        owner: v.labels.get(LABEL_OWNER).cloned().unwrap_or_default(),
                        store: v.labels.get(LABEL_STORE).cloned().unwrap_or_default(),
                        change_id: v.labels.get(LABEL_CHANGE).cloned().unwrap_or_default(),
                        step_id: v.labels.get(LABEL_STEP).cloned().unwrap_or_default(),
                        id: v.name,
                    }),
            );
            Ok(found)
        }
        .boxed()
    }

    fn remove<'a>(&'a self, left_over: &'a LeftOver) -> BoxFuture<'a, Result<(), ExecutorError>> {
        async move {
            let removed = match left_over.kind {
                LeftOverKind::Container => self.remove_container(&left_over.id).await,
                LeftOverKind::Network => gone(self.docker.remove_network(&left_over.id).await),
                LeftOverKind::Volume => gone(
                    self.docker
                        .remove_volume(
                            &left_over.id,
                            None::<bollard::query_parameters::RemoveVolumeOptions>,
                        )
                        .await,
                ),
            };
            removed.map_err(|e| ExecutorError::Container {
                action: "remove",
                step_id: left_over.step_id.clone(),
                message: e.to_string(),
            })
        }
        .boxed()
    }
}
