//! `/metrics` in the Prometheus text format (prometheus-client). Counters and histograms follow this process's
//! orchestrator (every change the server runs, whatever API started it): step durations, image builds and
//! cache hits, queue wait, finished steps by state. Gauges are read from the store at each scrape: changes by
//! state, running step containers, live leases. Web requests are counted by route and status.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::events::{ChangeState, Event, StepState};
use crate::orchestrator::Orchestrator;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    changes: Family<StateLabel, Gauge>,
    steps_finished: Family<StateLabel, Counter>,
    step_duration: Histogram,
    image_builds: Counter,
    image_cache_hits: Counter,
    queue_wait: Histogram,
    running_containers: Gauge,
    leases: Gauge,
    requests: Family<RequestLabels, Counter>,
    grpc_calls: Family<MethodLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(…)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("runner");
        let changes = Family::<StateLabel, Gauge>::default();
        registry.register("changes", "Changes in the store, by state", changes.clone());
        let steps_finished = Family::<StateLabel, Counter>::default();
        registry.register(
            "steps_finished",
            "Steps this server ran that ended, by final state",
            steps_finished.clone(),
        );
        // 0.1 s to ~27 min.
        let step_duration = Histogram::new(exponential_buckets(0.1, 2.0, 15));
        registry.register(
            "step_duration_seconds",
            "How long steps this server ran took, start to end",
            step_duration.clone(),
        );
        let image_builds = Counter::default();
        registry.register(
            "image_builds",
            "Step images built (not found in the cache)",
            image_builds.clone(),
        );
        let image_cache_hits = Counter::default();
        registry.register(
            "image_cache_hits",
            "Step images found in the cache",
            image_cache_hits.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        registry.register(
            "queue_wait_seconds",
            "How long changes this server ran waited from creation to start",
            queue_wait.clone(),
        );
        let running_containers = Gauge::default();
        registry.register(
            "running_containers",
            "Steps running in a container now",
            running_containers.clone(),
        );
        let leases = Gauge::default();
        registry.register(
            "leases",
            "Runner processes holding a lease in the store",
            leases.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests to the web server, by route, method and status",
            requests.clone(),
        );
        let grpc_calls = Family::<MethodLabel, Counter>::default();
        registry.register(
            "grpc_calls",
            "Calls to the gRPC API, by method (`other` for a method the server does not have)",
            grpc_calls.clone(),
        );
        Metrics {
            registry,
            grpc_calls,
            changes,
            steps_finished,
            step_duration,
            image_builds,
            image_cache_hits,
            queue_wait,
            running_containers,
            leases,
            requests,
        }
    }

    /// Reads the gauges from the store, then renders everything.
    pub async fn render(
        &self,
        store: &crate::store::Store,
    ) -> Result<String, crate::store::StoreError> {
        let counts = store.change_counts().await?;
        for state in [
            ChangeState::Pending,
            ChangeState::Queued,
            ChangeState::Running,
            ChangeState::Success,
            ChangeState::Error,
            ChangeState::Cancelled,
        ] {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.changes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n);
        }
        self.running_containers
            .set(store.running_containers().await?);
        let now = store.clock_ms().await?;
        let live = store
            .leases()
            .await?
            .iter()
            .filter(|l| l.expires_at > now)
            .count();
        self.leases.set(live as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        Ok(text)
    }

    /// Counts one call to the gRPC API.
    pub fn grpc_call(&self, method: &str) {
        self.grpc_calls
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .inc();
    }

    /// Records a step that ended.
    fn step_ended(&self, step: &crate::store::Step) {
        self.steps_finished
            .get_or_create(&StateLabel {
                state: step.state.as_str().to_owned(),
            })
            .inc();
        if let (Some(from), Some(to)) = (&step.started_at, &step.finished_at) {
            if let Some(secs) = super::layout::seconds_between(from, to) {
                self.step_duration.observe(secs.max(0.0));
            }
        }
        match step.image_cached {
            Some(true) => {
                self.image_cache_hits.inc();
            }
            Some(false) => {
                self.image_builds.inc();
            }
            None => {}
        }
    }
}

/// Follows the orchestrator's events into the counters and histograms until `stop`.
pub async fn observe(
    metrics: std::sync::Arc<Metrics>,
    orchestrator: Orchestrator,
    stop: CancellationToken,
) {
    let mut live = orchestrator.subscribe();
    let store = orchestrator.app().store.clone();
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return,
            r = live.recv() => r,
        };
        let record = match record {
            Ok(record) => record,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "metrics fell behind the events; some are not counted"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match &record.event {
            Event::StepState { step_id, state, .. } if state.is_final() => {
                if let Ok(step) = store.step(step_id).await {
                    if step.state != StepState::Pending {
                        metrics.step_ended(&step);
                    }
                }
            }
            Event::ChangeState {
                state: ChangeState::Running,
                ..
            } => {
                if let Ok(change) = store.change(&record.change_id).await {
                    if let Some(started) = &change.started_at {
                        if let Some(secs) =
                            super::layout::seconds_between(&change.created_at, started)
                        {
                            metrics.queue_wait.observe(secs.max(0.0));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Counts every request by its route (the pattern, never the ids in it), method and status.
pub async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// `GET /metrics`: open without a server token (loopback), else a bearer token or a session.
pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !state.sessions.may_scrape(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "send `Authorization: Bearer <token>` (the server's token) to read the metrics\n",
        )
            .into_response();
    }
    match state.metrics.render(state.store()).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the store did not answer: {}\n",
                crate::error::error_text(&e)
            ),
        )
            .into_response(),
    }
}
