//! The gRPC server (`runner serve`): project, change and step services over the same core as the CLI, plus
//! health and reflection. [`run`] is the whole server as a library function; tests start it on an ephemeral port.

pub mod auth;
pub mod calls;
mod changes;
mod code_pages;
pub mod convert;
mod idempotency;
mod list_filter;
mod page_tokens;
mod projects;
pub mod redact;
pub mod status;
mod step_run_wire;
mod step_runs;

/// Generated wire types and service stubs of `proto/runner/v1/runner.proto`.
pub mod pb {
    tonic::include_proto!("runner.v1");
    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/runner_descriptor.bin"));
}

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;

use crate::orchestrator::Orchestrator;

/// How the server is run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer token every call but health must carry. Required on a non-loopback address; an empty or blank one
    /// is refused (never taken as "no authentication").
    pub token: Option<String>,
    /// How long running changes may take to finish after a shutdown signal before they are cancelled.
    pub grace: Duration,
    /// How often dead runners' containers are looked for while serving.
    pub reap_every: Duration,
    /// Serve TLS with this certificate and key (PEM) instead of plaintext.
    pub tls: Option<TlsIdentity>,
    /// Told of every call, by method (`runner serve`'s `/metrics` counts them).
    pub calls: Option<calls::CallCounter>,
}

/// A PEM certificate chain and its private key.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(…)")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            token: None,
            grace: Duration::from_secs(30),
            reap_every: Duration::from_secs(60),
            tls: None,
            calls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("refusing to listen on {addr} without a token: anyone who can reach it could run changes; give --token-file or RUNNER_TOKEN, or listen on 127.0.0.1")]
    NoToken { addr: SocketAddr },
    #[error("failed to read the listener address")]
    Address(#[source] std::io::Error),
    #[error("the gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
    #[error("invalid TLS certificate or key: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("failed to set up reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error(transparent)]
    Token(#[from] auth::TokenError),
    #[error(transparent)]
    Core(#[from] crate::error::Error),
}

impl ServerConfig {
    /// Checks the configuration can serve on `addr`, before anything is started or announced: a given token is
    /// not blank, and off loopback there is one.
    pub fn check(&self, addr: SocketAddr) -> Result<Option<auth::Token>, ServerError> {
        let token = self.token.as_deref().map(auth::Token::new).transpose()?;
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(ServerError::NoToken { addr });
        }
        Ok(token)
    }
}

/// Serves until `shutdown` completes; then stops accepting, lets running changes finish for `config.grace`, and
/// cancels what is still running (SIGTERM, then SIGKILL, as a cancel does).
pub async fn run(
    listener: TcpListener,
    orchestrator: Orchestrator,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(ServerError::Address)?;
    let token = config.check(addr)?;
    // Bad TLS material fails before anything is started.
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(ServerError::Tls)?;
    }
    let stop = CancellationToken::new();
    // The lease outlives the grace period: it is given up only once every change this server runs has ended, so no
    // runner started meanwhile mistakes its containers for a dead runner's.
    let stop_lease = CancellationToken::new();
    let lease = orchestrator.hold_lease(stop_lease.clone()).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::NotServing).await;
    tokio::spawn(follow_docker(
        health.clone(),
        orchestrator.clone(),
        stop.clone(),
        config.reap_every,
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServerError::Reflection)?;
    // Older tools (grpcurl before 1.8.8, some IDEs) ask v1alpha only.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServerError::Reflection)?;
    let auth = auth::Auth { expected: token };
    let tasks = TaskTracker::new();
    let stop_runs = CancellationToken::new();
    let changes = changes::Changes {
        orchestrator: orchestrator.clone(),
        tasks: tasks.clone(),
        stop_runs: stop_runs.clone(),
        stop_watches: stop.clone(),
    };
    let projects = projects::Projects {
        app: orchestrator.app().clone(),
    };
    let step_runner = step_runs::StepRunner::new(
        orchestrator.clone(),
        tasks.clone(),
        stop_runs.clone(),
        stop.clone(),
    );

    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let served = builder
        .layer(calls::CountLayer::new(config.calls.clone()))
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, auth.clone()))
        .add_service(InterceptedService::new(reflection_alpha, auth.clone()))
        .add_service(InterceptedService::new(
            pb::project_service_server::ProjectServiceServer::new(projects),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            pb::change_service_server::ChangeServiceServer::new(changes),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            pb::step_runner_service_server::StepRunnerServiceServer::new(step_runner),
            auth,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            signal,
        )
        .await;

    stop.cancel();
    tasks.close();
    if tokio::time::timeout(config.grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; cancelling the changes still running");
        stop_runs.cancel();
        tasks.wait().await;
    }
    stop_lease.cancel();
    let _ = lease.await;
    served.map_err(ServerError::Transport)
}

/// How often health asks the daemon whether it is there.
const DOCKER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Health follows the Docker daemon: SERVING while it answers (the store is open: we hold a lease in it),
/// NOT_SERVING while it does not — at start, or when it goes away. What a dead runner left is reaped when the
/// daemon answers and every `reap_every` after.
async fn follow_docker(
    health: tonic_health::server::HealthReporter,
    orchestrator: Orchestrator,
    stop: CancellationToken,
    reap_every: Duration,
) {
    let (mut serving, mut said_missing) = (false, false);
    let mut last_reap = std::time::Instant::now();
    loop {
        let answered = orchestrator.executor_available().await;
        match (&answered, serving) {
            (Ok(()), false) => {
                match orchestrator.reap().await {
                    Ok(reaped) => tracing::info!(?reaped, "docker answered; serving"),
                    Err(e) => tracing::warn!(error = %e, "docker answered but reaping failed"),
                }
                last_reap = std::time::Instant::now();
                set_health(&health, tonic_health::ServingStatus::Serving).await;
                serving = true;
            }
            (Err(e), true) => {
                tracing::warn!(error = %e, "the Docker daemon went away; not serving");
                set_health(&health, tonic_health::ServingStatus::NotServing).await;
                serving = false;
            }
            (Err(e), false) if !said_missing => {
                tracing::warn!(error = %e, "no Docker daemon answers; not serving until one does");
                said_missing = true;
            }
            (Ok(()), true) if last_reap.elapsed() >= reap_every => {
                if let Err(e) = orchestrator.reap().await {
                    tracing::warn!(error = %e, "reaping failed");
                }
                last_reap = std::time::Instant::now();
            }
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(DOCKER_CHECK_EVERY) => {}
        }
    }
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health
        .set_service_status(
            <pb::change_service_server::ChangeServiceServer<changes::Changes> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <pb::project_service_server::ProjectServiceServer<projects::Projects> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <pb::step_runner_service_server::StepRunnerServiceServer<step_runs::StepRunner> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health.set_service_status("", status).await;
}
