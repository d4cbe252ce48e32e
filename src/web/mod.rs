//! The web view served by `runner serve --http ADDR`: server-rendered pages of changes, steps, logs and
//! properties (live through Server-Sent Events), `/metrics` for Prometheus, and `/healthz`/`/readyz`. [`run`] is
//! the whole server as a library function, like [`crate::grpc::run`]; both serve the same store and orchestrator.
//!
//! Files: `router` (routes and headers), `auth` (token login, session cookie, CSRF), `error` (the one place
//! errors become HTTP answers), `layout` and `pages/*` (HTML), `sse` (live updates), `metrics`, `health`.

pub mod auth;
mod error;
mod health;
mod layout;
pub mod metrics;
mod pages;
mod router;
mod sse;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::grpc::auth::{Token, TokenError};
use crate::orchestrator::Orchestrator;

pub use router::router;

/// The changes list page for a query string's filter (what `runner bench web` times): `Ok(html)`.
pub async fn render_changes_page(
    store: &crate::store::Store,
    project: Option<String>,
    state: Option<String>,
    page: u32,
) -> Result<String, String> {
    let query = pages::changes::ListQuery {
        project,
        state,
        page: Some(page.to_string()),
        ..Default::default()
    };
    pages::changes::render(store, &query)
        .await
        .map(|m| m.into_string())
        .map_err(|e| crate::error::error_text(&e))
}

/// How the web server is run.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The token a person logs in with (the gRPC API's). Required on a non-loopback address; a blank one is
    /// refused.
    pub token: Option<String>,
    /// How long changes retried from the web may take to finish after shutdown before they are cancelled.
    pub grace: Duration,
    /// The metrics to serve, when shared with the gRPC server (which counts its calls into them); else new ones.
    pub metrics: Option<Arc<metrics::Metrics>>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            token: None,
            grace: Duration::from_secs(30),
            metrics: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("refusing to serve the web view on {addr} without a token: anyone who can reach it could see and cancel changes; give --token-file or RUNNER_TOKEN, or use --http 127.0.0.1:PORT")]
    NoToken { addr: SocketAddr },
    #[error("failed to read the listener address")]
    Address(#[source] std::io::Error),
    #[error("the web server failed")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl WebConfig {
    /// Checks the configuration can serve on `addr` before anything starts: a given token is not blank, and off
    /// loopback there is one.
    pub fn check(&self, addr: SocketAddr) -> Result<Option<Token>, WebError> {
        let token = self.token.as_deref().map(Token::new).transpose()?;
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(WebError::NoToken { addr });
        }
        Ok(token)
    }
}

/// What every handler shares.
pub struct Shared {
    pub(crate) orchestrator: Orchestrator,
    pub(crate) sessions: auth::Sessions,
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Changes retried from the web run here, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    pub(crate) stop_runs: CancellationToken,
    /// Ends live streams at shutdown.
    pub(crate) stop: CancellationToken,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn new(
        orchestrator: Orchestrator,
        token: Option<Token>,
        metrics: Arc<metrics::Metrics>,
    ) -> AppState {
        Arc::new(Shared {
            orchestrator,
            sessions: auth::Sessions::new(token),
            metrics,
            tasks: TaskTracker::new(),
            stop_runs: CancellationToken::new(),
            stop: CancellationToken::new(),
        })
    }

    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.orchestrator.app().store
    }

    /// Runs a change (a retry) in this server, until it ends or shutdown's grace is over.
    pub(crate) fn start(&self, id: String) {
        let (orchestrator, cancel) = (self.orchestrator.clone(), self.stop_runs.child_token());
        self.tasks.spawn(async move {
            if let Err(e) = orchestrator.run_change(&id, cancel).await {
                tracing::error!(change_id = %id, error = %e, "change run failed");
            }
        });
    }
}

/// Serves the web view until `shutdown` completes; then closes live streams, stops accepting, and gives changes
/// retried from the web `config.grace` to finish before cancelling them.
pub async fn run(
    listener: TcpListener,
    orchestrator: Orchestrator,
    config: WebConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebError> {
    let addr = listener.local_addr().map_err(WebError::Address)?;
    let token = config.check(addr)?;
    let metrics = config
        .metrics
        .clone()
        .unwrap_or_else(|| Arc::new(metrics::Metrics::new()));
    let shared = Shared::new(orchestrator, token, metrics.clone());
    let observer = tokio::spawn(metrics::observe(
        metrics,
        shared.orchestrator.clone(),
        shared.stop.clone(),
    ));
    let stop = shared.stop.clone();
    let served = axum::serve(listener, router(shared.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await;
    shared.stop.cancel();
    shared.tasks.close();
    if tokio::time::timeout(config.grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; cancelling the changes retried from the web");
        shared.stop_runs.cancel();
        shared.tasks.wait().await;
    }
    let _ = observer.await;
    served.map_err(WebError::Serve)
}
