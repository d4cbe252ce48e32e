//! The changes list: newest first, filtered by project, environment and state, 50 a page, with badges that
//! follow unfinished changes live.

use axum::extract::{Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use super::super::error::PageError;
use super::super::layout::{badge, duration, page, time};
use super::super::AppState;
use crate::events::ChangeState;
use crate::store::{Change, Store, WebChangeFilter};

pub const PAGE_SIZE: i64 = 50;
const STATES: [&str; 6] = [
    "pending",
    "queued",
    "running",
    "success",
    "error",
    "cancelled",
];

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub project: Option<String>,
    pub environment: Option<String>,
    pub state: Option<String>,
    pub page: Option<String>,
}

fn given(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The filter a query asks for; a bad state or page is refused, naming what is allowed.
pub fn filter(q: &ListQuery) -> Result<(WebChangeFilter, i64), PageError> {
    let state = match given(&q.state) {
        None => None,
        Some(s) => Some(ChangeState::parse(&s).ok_or_else(|| {
            PageError::BadRequest(format!(
                "unknown state {s:?}: use one of {}",
                STATES.join(", ")
            ))
        })?),
    };
    let page = match given(&q.page) {
        None => 1,
        Some(p) => p
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=1_000_000).contains(p))
            .ok_or_else(|| {
                PageError::BadRequest(format!("invalid page {p:?}: use a page number from 1"))
            })?,
    };
    Ok((
        WebChangeFilter {
            project: given(&q.project),
            environment: given(&q.environment),
            state,
            limit: PAGE_SIZE + 1,
            offset: (page - 1) * PAGE_SIZE,
        },
        page,
    ))
}

pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Markup, PageError> {
    render(state.store(), &q).await
}

/// The whole page for `q` (also what `runner bench web` times).
pub async fn render(store: &Store, q: &ListQuery) -> Result<Markup, PageError> {
    let (filter, page_no) = filter(q)?;
    let mut changes = store.web_changes(&filter).await?;
    let more = changes.len() as i64 > PAGE_SIZE;
    changes.truncate(PAGE_SIZE as usize);
    let projects = store.list_projects().await?;
    let link = |page: i64| {
        let mut parts = vec![];
        for (k, v) in [
            ("project", &filter.project),
            ("environment", &filter.environment),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        if let Some(s) = filter.state {
            parts.push(format!("state={s}"));
        }
        parts.push(format!("page={page}"));
        format!("/changes?{}", parts.join("&"))
    };
    let live: Vec<&str> = changes
        .iter()
        .filter(|c| !c.state.is_final())
        .map(|c| c.id.as_str())
        .collect();
    Ok(page(
        "Changes",
        html! {
            h1 { "Changes" }
            form.filters method="get" action="/changes" role="search" aria-label="Filter changes" {
                div {
                    label for="f-project" { "Project" }
                    select #f-project name="project" {
                        option value="" { "any" }
                        @for p in &projects {
                            option value=(p.code) selected[filter.project.as_deref() == Some(p.code.as_str())] { (p.code) }
                        }
                    }
                }
                div {
                    label for="f-environment" { "Environment" }
                    input #f-environment name="environment" size="12" value=(filter.environment.as_deref().unwrap_or(""));
                }
                div {
                    label for="f-state" { "State" }
                    select #f-state name="state" {
                        option value="" { "any" }
                        @for s in STATES {
                            option value=(s) selected[filter.state.map(|f| f.as_str()) == Some(s)] { (s) }
                        }
                    }
                }
                button type="submit" { "Filter" }
            }
            @if changes.is_empty() {
                p { "No changes match." }
            } @else {
                div.table-wrap {
                    table #changes data-live=[(!live.is_empty()).then_some("badges")]
                        data-events=[(!live.is_empty()).then(|| format!("/changes/states?ids={}", live.join(",")))] {
                        caption.muted { "Page " (page_no) ", newest first" }
                        thead { tr {
                            th scope="col" { "Change" }
                            th scope="col" { "State" }
                            th scope="col" { "Project / environment" }
                            th scope="col" { "Action" }
                            th scope="col" .wide { "Created" }
                            th scope="col" .wide { "Took" }
                        } }
                        tbody {
                            @for c in &changes { (row(c)) }
                        }
                    }
                }
            }
            nav.pages aria-label="Pages" {
                @if page_no > 1 { a rel="prev" href=(link(page_no - 1)) { "← Newer" } }
                @if more { a rel="next" href=(link(page_no + 1)) { "Older →" } }
            }
        },
    ))
}

fn row(c: &Change) -> Markup {
    html! {
        tr data-change=(c.id) {
            td { a href={ "/changes/" (c.id) } { code { (c.id.get(..8).unwrap_or(&c.id)) } } }
            td { (badge(c.state.as_str())) }
            td { (c.project) " / " (c.environment) }
            td { (c.action) }
            td.wide { (time(&c.created_at)) }
            td.wide { (duration(c.started_at.as_deref(), c.finished_at.as_deref()).unwrap_or_default()) }
        }
    }
}

/// Percent-encodes a query value (codes are plain, but a filter typed by hand may not be).
pub fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_states_and_pages_are_refused_by_name() {
        let q = |state: &str, page: &str| ListQuery {
            state: Some(state.into()),
            page: Some(page.into()),
            ..Default::default()
        };
        let err = filter(&q("done", "1")).unwrap_err().to_string();
        assert!(err.contains("\"done\"") && err.contains("running"), "{err}");
        for page in ["0", "-1", "x", "99999999999"] {
            assert!(filter(&q("", page)).is_err(), "{page}");
        }
        let (f, page) = filter(&q("running", "3")).unwrap();
        assert_eq!(
            (f.state, f.offset, page),
            (Some(ChangeState::Running), 100, 3)
        );
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
