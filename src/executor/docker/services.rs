//! A step's background services: a private network, one container per service, readiness probes (a TCP connect or
//! a command in the service, never a fixed sleep), and teardown that keeps the services' logs.

use bollard::query_parameters::{CreateContainerOptions, LogsOptions, RemoveContainerOptions};
use bollard::Docker;
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Sender;

use super::spec;
use crate::actions::{Readiness, Service, DIND_SERVICE};
use crate::executor::{ExecutorError, LogLine, StepDocker, StepRun, Stream};

const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(60);
/// A step must start within half a second of its services being ready (tests/e2e.rs checks it).
const PROBE_EVERY: Duration = Duration::from_millis(50);
const EXIT_CHECK_EVERY: Duration = Duration::from_millis(500);
const LOG_TAIL: usize = 20;

fn failed(run: &StepRun, service: &str, problem: String, log_tail: Vec<String>) -> ExecutorError {
    ExecutorError::Service {
        step_id: run.step_id.clone(),
        service: service.to_owned(),
        problem,
        log_tail,
    }
}

/// Creates the network and starts every service (and the step's own daemon for `docker: dind`), without waiting
/// for them: the caller creates the step container meanwhile, then calls [`ready`]. On failure, what was started is
/// left for [`stop`] (which the caller always runs).
pub async fn start(docker: &Docker, run: &StepRun) -> Result<(), ExecutorError> {
    docker
        .create_network(spec::network_body(run))
        .await
        .map_err(|e| {
            failed(
                run,
                "(network)",
                format!("could not get its network: {e}"),
                vec![],
            )
        })?;
    for (name, service) in &run.services {
        let image = service.image.as_deref().unwrap_or_default();
        if docker.inspect_image(image).await.is_err() {
            return Err(failed(
                run,
                name,
                format!("needs image {image:?}, which does not exist locally; no registry can be reached, so build or load it first, or give the service a `build` (pull_policy {} cannot pull)", service.pull_policy.as_deref().unwrap_or("if-not-present")),
                vec![],
            ));
        }
        create_and_start(docker, run, name, spec::service_body(run, name, service)).await?;
    }
    if let Some(StepDocker::Dind { image }) = &run.docker {
        let volumes = spec::dind_volumes(run);
        for volume in [&volumes.data, &volumes.socket] {
            docker
                .create_volume(spec::volume_body(run, volume))
                .await
                .map_err(|e| {
                    failed(
                        run,
                        DIND_SERVICE,
                        format!("could not get its volume {volume}: {e}"),
                        vec![],
                    )
                })?;
        }
        create_and_start(docker, run, DIND_SERVICE, spec::dind_body(run, image)).await?;
    }
    Ok(())
}

/// Returns when every service [`start`] started passed its readiness probe.
pub async fn ready(docker: &Docker, run: &StepRun) -> Result<(), ExecutorError> {
    crate::orchestrator::crash_point::reached("starting-services").await;
    for (name, service) in &run.services {
        wait_ready(docker, run, name, service).await?;
    }
    if let Some(StepDocker::Dind { image }) = &run.docker {
        wait_ready(docker, run, DIND_SERVICE, &spec::dind_service(image)).await?;
    }
    Ok(())
}

async fn create_and_start(
    docker: &Docker,
    run: &StepRun,
    name: &str,
    body: bollard::models::ContainerCreateBody,
) -> Result<(), ExecutorError> {
    let container = spec::service_container_name(run, name);
    let options = CreateContainerOptions {
        name: Some(container.clone()),
        ..Default::default()
    };
    docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| failed(run, name, format!("could not be created: {e}"), vec![]))?;
    docker
        .start_container(
            &container,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| failed(run, name, format!("could not be started: {e}"), vec![]))
}

async fn wait_ready(
    docker: &Docker,
    run: &StepRun,
    name: &str,
    service: &Service,
) -> Result<(), ExecutorError> {
    let Some(readiness) = &service.readiness else {
        return Ok(());
    };
    let timeout = service
        .readiness_timeout
        .unwrap_or(DEFAULT_READINESS_TIMEOUT);
    let container = spec::service_container_name(run, name);
    let deadline = Instant::now() + timeout;
    let mut address = None;
    let mut exit_checked = Instant::now();
    loop {
        if probe(docker, run, &container, readiness, &mut address).await {
            return Ok(());
        }
        // A service that exited will never get ready: say so now rather than at the deadline (asked at most every
        // EXIT_CHECK_EVERY, so the daemon's answers do not slow the probe down).
        let exited = match exit_checked.elapsed() >= EXIT_CHECK_EVERY {
            true => {
                exit_checked = Instant::now();
                exit_code(docker, &container).await
            }
            false => None,
        };
        if let Some(code) = exited {
            return Err(failed(
                run,
                name,
                format!("exited with code {code} before it was ready"),
                log_tail(docker, &container).await,
            ));
        }
        if Instant::now() >= deadline {
            let probe = match readiness {
                Readiness::Tcp(port) => format!("port {port} never accepted a connection"),
                Readiness::Exec(cmd) => format!("`{}` never exited 0", cmd.join(" ")),
            };
            return Err(failed(
                run,
                name,
                format!(
                    "was not ready after {}: {probe}",
                    crate::actions::format_duration(timeout)
                ),
                log_tail(docker, &container).await,
            ));
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The exit code of a container that is no longer running; `None` while it runs (or cannot be inspected).
async fn exit_code(docker: &Docker, container: &str) -> Option<i64> {
    let state = docker
        .inspect_container(container, None)
        .await
        .ok()?
        .state?;
    match state.running {
        Some(false) => Some(state.exit_code.unwrap_or(-1)),
        _ => None,
    }
}

/// One probe; `address` keeps the service's IP on the step's network once known (it does not change while the
/// container lives).
async fn probe(
    docker: &Docker,
    run: &StepRun,
    container: &str,
    readiness: &Readiness,
    address: &mut Option<String>,
) -> bool {
    match readiness {
        Readiness::Tcp(port) => {
            // The service's address on the step's network, reachable from this host through the bridge.
            if address.is_none() {
                let Ok(inspect) = docker.inspect_container(container, None).await else {
                    return false;
                };
                *address = inspect
                    .network_settings
                    .and_then(|n| n.networks)
                    .and_then(|mut n| n.remove(&spec::network_name(run)))
                    .and_then(|e| e.ip_address)
                    .filter(|ip| !ip.is_empty());
            }
            let Some(ip) = address.as_deref() else {
                return false;
            };
            let connect = tokio::net::TcpStream::connect((ip, *port));
            matches!(
                tokio::time::timeout(Duration::from_secs(1), connect).await,
                Ok(Ok(_))
            )
        }
        Readiness::Exec(cmd) => {
            let config = bollard::models::ExecConfig {
                cmd: Some(cmd.clone()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            };
            let Ok(exec) = docker.create_exec(container, config).await else {
                return false;
            };
            if let Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) =
                docker.start_exec(&exec.id, None).await
            {
                while output.next().await.is_some() {}
            }
            matches!(docker.inspect_exec(&exec.id).await, Ok(i) if i.exit_code == Some(0))
        }
    }
}

async fn logs_of(docker: &Docker, container: &str) -> Vec<String> {
    let options = LogsOptions {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let mut lines = vec![];
    let mut stream = docker.logs(container, Some(options));
    while let Some(Ok(chunk)) = stream.next().await {
        lines.extend(chunk.to_string().lines().map(str::to_owned));
    }
    lines
}

async fn log_tail(docker: &Docker, container: &str) -> Vec<String> {
    let lines = logs_of(docker, container).await;
    lines[lines.len().saturating_sub(LOG_TAIL)..].to_vec()
}

/// Keeps each service's log with the step (lines `[service NAME] …`; a service's exit code fails nothing), then
/// removes the services, the network and the step's volumes.
pub async fn stop(
    docker: &Docker,
    run: &StepRun,
    logs: &Sender<LogLine>,
) -> Result<(), ExecutorError> {
    let mut first_error = None;
    for name in &spec::service_names(run) {
        let container = spec::service_container_name(run, name);
        for line in logs_of(docker, &container).await {
            let _ = logs
                .send(LogLine::line(
                    Stream::Stderr,
                    &crate::events::service_line(name, &line),
                ))
                .await;
        }
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        if let Err(e) = super::gone(docker.remove_container(&container, Some(options)).await) {
            first_error.get_or_insert(failed(
                run,
                name,
                format!("could not be removed: {e}"),
                vec![],
            ));
        }
    }
    if let Err(e) = super::gone(docker.remove_network(&spec::network_name(run)).await) {
        first_error.get_or_insert(failed(
            run,
            "(network)",
            format!("could not be removed: {e}"),
            vec![],
        ));
    }
    if matches!(run.docker, Some(StepDocker::Dind { .. })) {
        let volumes = spec::dind_volumes(run);
        for volume in [&volumes.data, &volumes.socket] {
            let options = None::<bollard::query_parameters::RemoveVolumeOptions>;
            if let Err(e) = super::gone(docker.remove_volume(volume, options).await) {
                first_error.get_or_insert(failed(
                    run,
                    DIND_SERVICE,
                    format!("could not have its volume {volume} removed: {e}"),
                    vec![],
                ));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
