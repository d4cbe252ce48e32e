//! `/healthz` (the process answers) and `/readyz` (the store answers a query and the Docker daemon answers), for
//! load balancers and orchestrators; no authentication, no detail beyond what is down.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use std::time::Duration;

use super::AppState;

/// How long readiness waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let store = matches!(
        tokio::time::timeout(CHECK_TIMEOUT, state.store().ping()).await,
        Ok(Ok(()))
    );
    let docker = matches!(
        tokio::time::timeout(CHECK_TIMEOUT, state.orchestrator.executor_available()).await,
        Ok(Ok(()))
    );
    let text = format!(
        "store: {}\ndocker: {}\n",
        if store { "ok" } else { "not answering" },
        if docker { "ok" } else { "not answering" }
    );
    let status = if store && docker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, text)
}
