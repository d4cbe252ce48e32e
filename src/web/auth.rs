//! Who may look and act: the gRPC API's token, given once in a login form, then a session cookie
//! (`Secure; HttpOnly; SameSite=Strict`); or `Authorization: Bearer <token>` (a Prometheus scraper). Every
//! state-changing form carries the session's CSRF token, and a cross-origin `Origin` is refused on top.
//! Without a token (loopback only) no login is asked, but forms still need a session's CSRF token.

use axum::extract::{Form, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

use super::error::PageError;
use super::{layout, AppState};
use crate::grpc::auth::Token;

pub const COOKIE: &str = "runner_session";
/// How long a session lasts from its login.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest go first): a flood of logins cannot grow memory without bound.
const MAX_SESSIONS: usize = 10_000;

/// The caller of a request, as the pages see it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The CSRF token forms must carry; `None` for bearer callers (no cookie, so no cross-site forgery).
    pub csrf: Option<String>,
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// The sessions of this server (in memory: a restart logs everyone out).
pub struct Sessions {
    token: Option<Token>,
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    pub fn new(token: Option<Token>) -> Sessions {
        Sessions {
            token,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn needs_login(&self) -> bool {
        self.token.is_some()
    }

    /// A new session; returns (id, csrf).
    fn create(&self) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_LIFETIME,
            },
        );
        (id, csrf)
    }

    fn csrf_of(&self, id: &str) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Whether `/metrics` may be read: always without a server token, else with the bearer token or a session.
    pub fn may_scrape(&self, headers: &HeaderMap) -> bool {
        !self.needs_login()
            || self.bearer_ok(headers)
            || session_cookie(headers).is_some_and(|id| self.csrf_of(&id).is_some())
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .is_some_and(|given| !given.is_empty() && token.matches(given))
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

fn set_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict"
    ))
    .expect("hex is a valid header value")
}

/// Guards every page but login, health and static assets: a valid session (or bearer token) passes with its
/// [`Caller`]; anything else gets 401 and the login form. Without a server token a session is made on the spot.
pub async fn require(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let sessions = &state.sessions;
    let cookie = session_cookie(request.headers());
    if let Some(csrf) = cookie.as_deref().and_then(|id| sessions.csrf_of(id)) {
        request.extensions_mut().insert(Caller { csrf: Some(csrf) });
        return next.run(request).await;
    }
    if sessions.bearer_ok(request.headers()) {
        request.extensions_mut().insert(Caller { csrf: None });
        return next.run(request).await;
    }
    if !sessions.needs_login() {
        let (id, csrf) = sessions.create();
        request.extensions_mut().insert(Caller { csrf: Some(csrf) });
        let mut response = next.run(request).await;
        response
            .headers_mut()
            .append(header::SET_COOKIE, set_cookie(&id));
        return response;
    }
    let next_path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .filter(|_| request.method() == Method::GET)
        .unwrap_or_else(|| "/".to_owned());
    (StatusCode::UNAUTHORIZED, layout::login(&next_path, None)).into_response()
}

/// Checks a state-changing request: the form's CSRF token is the session's, and the `Origin`, when sent, is
/// this server. Bearer callers carry no cookie, so nothing can be forged on their behalf.
pub fn check_csrf(caller: &Caller, headers: &HeaderMap, given: &str) -> Result<(), PageError> {
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
        if origin_host != host {
            return Err(PageError::Forbidden(format!(
                "a form from {origin} may not act on this server: use the page served by {host}"
            )));
        }
    }
    match &caller.csrf {
        None => Ok(()),
        Some(expected) if same(expected, given) => Ok(()),
        Some(_) => Err(PageError::Forbidden(
            "the form's CSRF token is missing or stale: reload the page and try again".into(),
        )),
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
pub struct NextQuery {
    #[serde(default)]
    next: String,
}

/// Only a path on this server (never `//host` or a scheme) is followed after login.
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

pub async fn login_page(axum::extract::Query(q): axum::extract::Query<NextQuery>) -> Response {
    layout::login(local_path(&q.next), None).into_response()
}

pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = local_path(&form.next).to_owned();
    if let Err(e) = check_csrf(&Caller { csrf: None }, &headers, "") {
        return e.into_response();
    }
    let ok = match &state.sessions.token {
        Some(token) => token.matches(form.token.trim()),
        None => true,
    };
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            layout::login(&next, Some("That token is not valid for this server.")),
        )
            .into_response();
    }
    let (id, _) = state.sessions.create();
    let mut response = Redirect::to(&next).into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, set_cookie(&id));
    response
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    check_csrf(&caller, &headers, &form.csrf)?;
    if let Some(id) = session_cookie(&headers) {
        state.sessions.remove(&id);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "runner_session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict",
        ),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(
            local_path("/changes?state=running"),
            "/changes?state=running"
        );
        for bad in [
            "//evil.example/x",
            "https://evil.example",
            "",
            "x",
            "/\\evil",
        ] {
            assert_eq!(local_path(bad), "/", "{bad:?}");
        }
    }

    #[test]
    fn csrf_needs_the_sessions_token_and_a_same_origin() {
        let caller = Caller {
            csrf: Some("abc".into()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(check_csrf(&caller, &headers, "abc").is_ok());
        assert!(check_csrf(&caller, &headers, "abd").is_err());
        assert!(check_csrf(&caller, &headers, "").is_err());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(check_csrf(&caller, &headers, "abc").is_ok());
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(check_csrf(&caller, &headers, "abc").is_err());
    }

    #[test]
    fn sessions_expire_and_are_forgotten_on_logout() {
        let sessions = Sessions::new(None);
        let (id, csrf) = sessions.create();
        assert_eq!(sessions.csrf_of(&id), Some(csrf));
        assert_eq!(sessions.csrf_of("nope"), None);
        sessions.remove(&id);
        assert_eq!(sessions.csrf_of(&id), None);
    }
}
