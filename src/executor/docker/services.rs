//! A step's background services: a private network, one container per service, readiness probes (a TCP connect or
//! a command in the service, never a fixed sleep), and teardown that keeps the services' logs.

use bollard::query_parameters::{CreateContainerOptions, LogsOptions, RemoveContainerOptions};
use bollard::Docker;
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

use super::spec;
use crate::actions::{Readiness, Service};
use crate::executor::{ExecutorError, LogLine, StepRun, Stream};

const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(60);
const PROBE_EVERY: Duration = Duration::from_millis(200);
const LOG_TAIL: usize = 20;

fn failed(run: &StepRun, service: &str, problem: String, log_tail: Vec<String>) -> ExecutorError {
    ExecutorError::Service {
        step_id: run.step_id.clone(),
        service: service.to_owned(),
        problem,
        log_tail,
    }
}

/// Creates the network and starts every service; returns when all are ready. On failure, what was started is
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
        if docker.inspect_image(&service.image).await.is_err() {
            return Err(failed(
                run,
                name,
                format!("needs image {:?}, which does not exist locally; no registry can be reached, so build or load it first (pull_policy {} cannot pull)", service.image, service.pull_policy.as_deref().unwrap_or("if-not-present")),
                vec![],
            ));
        }
        let options = CreateContainerOptions {
            name: Some(spec::service_container_name(run, name)),
            ..Default::default()
        };
        docker
            .create_container(Some(options), spec::service_body(run, name, service))
            .await
            .map_err(|e| failed(run, name, format!("could not be created: {e}"), vec![]))?;
        docker
            .start_container(
                &spec::service_container_name(run, name),
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| failed(run, name, format!("could not be started: {e}"), vec![]))?;
    }
    for (name, service) in &run.services {
        wait_ready(docker, run, name, service).await?;
    }
    Ok(())
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
    loop {
        if probe(docker, run, &container, readiness).await {
            return Ok(());
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

async fn probe(docker: &Docker, run: &StepRun, container: &str, readiness: &Readiness) -> bool {
    match readiness {
        Readiness::Tcp(port) => {
            // The service's address on the step's network, reachable from this host through the bridge.
            let Ok(inspect) = docker.inspect_container(container, None).await else {
                return false;
            };
            let ip = inspect
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|mut n| n.remove(&spec::network_name(run)))
                .and_then(|e| e.ip_address)
                .filter(|ip| !ip.is_empty());
            let Some(ip) = ip else { return false };
            let connect = tokio::net::TcpStream::connect((ip.as_str(), *port));
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
/// removes the services and the network.
pub async fn stop(
    docker: &Docker,
    run: &StepRun,
    logs: &UnboundedSender<LogLine>,
) -> Result<(), ExecutorError> {
    let mut first_error = None;
    for name in run.services.keys() {
        let container = spec::service_container_name(run, name);
        for line in logs_of(docker, &container).await {
            let _ = logs.send(LogLine {
                stream: Stream::Stderr,
                line: format!("[service {name}] {line}"),
            });
        }
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match docker.remove_container(&container, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => {}
            Err(e) => {
                first_error.get_or_insert(failed(
                    run,
                    name,
                    format!("could not be removed: {e}"),
                    vec![],
                ));
            }
        }
    }
    match docker.remove_network(&spec::network_name(run)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => {
            first_error.get_or_insert(failed(
                run,
                "(network)",
                format!("could not be removed: {e}"),
                vec![],
            ));
        }
    }
    first_error.map_or(Ok(()), Err)
}
