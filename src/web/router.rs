//! The routes, and the headers every answer carries (no framing, no sniffing, scripts from this server only).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::pages::{change, changes, projects, properties, step};
use super::{auth, health, metrics, sse, AppState};

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The whole web application over `state`.
pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/", get(|| async { Redirect::to("/changes") }))
        .route("/changes", get(changes::list))
        .route("/changes/states", get(sse::badges))
        .route("/changes/{id}", get(change::show))
        .route("/changes/{id}/live", get(change::live))
        .route("/changes/{id}/events", get(sse::change))
        .route("/changes/{id}/cancel", post(change::cancel))
        .route("/changes/{id}/retry", post(change::retry))
        .route("/steps/{id}", get(step::show))
        .route("/steps/{id}/facts", get(step::facts_part))
        .route("/steps/{id}/events", get(sse::step))
        .route("/projects", get(projects::list))
        .route(
            "/projects/{project}/environments",
            get(projects::environments),
        )
        .route("/projects/{project}/properties", get(properties::project))
        .route(
            "/projects/{project}/environments/{environment}/properties",
            get(properties::environment),
        )
        .route("/logout", post(auth::logout))
        .route_layer(from_fn_with_state(state.clone(), auth::require));
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route(
            "/static/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/static/style.css",
            get(|| asset(STYLE_CSS, "text/css; charset=utf-8")),
        )
        .merge(guarded)
        .fallback(not_found)
        .layer(from_fn_with_state(state.clone(), metrics::count))
        .layer(from_fn_with_state(state.clone(), loopback_host))
        .layer(from_fn(security_headers))
        .with_state(state)
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        super::layout::error_page(StatusCode::NOT_FOUND, "There is no such page here."),
    )
        .into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: under it a browser sends `Origin: null` with this server's own forms.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Without a token the server is open to anyone on this host: it then answers only requests addressed to a
/// loopback name, so a web page elsewhere cannot reach it through a DNS name re-pointed at 127.0.0.1.
async fn loopback_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.sessions.needs_login() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_loopback_host(host) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this server has no token, so it answers only requests for 127.0.0.1, [::1] or localhost\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_names_pass_without_a_token() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:1",
            "[::1]:80",
            "127.0.0.1",
            "localhost",
        ] {
            assert!(super::is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "10.0.0.1:80",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!super::is_loopback_host(bad), "{bad}");
        }
    }
}
