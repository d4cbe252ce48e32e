//! A project's or environment's properties: the current document, every version (when, and which change and
//! step or which client wrote it) and the difference between any two versions, as exactly the changed paths.

use axum::extract::{Path, Query, State};
use maud::{html, Markup};
use serde::Deserialize;

use super::super::error::PageError;
use super::super::layout::{json_block, page, time};
use super::super::AppState;
use super::change::short;
use super::diff::{changed_paths, table};
use super::{masked_json, masker};
use crate::store::{PropertiesOwner, PropertiesVersion, WrittenBy};

#[derive(Debug, Default, Deserialize)]
pub struct DiffQuery {
    pub from: Option<String>,
    pub to: Option<String>,
}

pub async fn project(
    State(state): State<AppState>,
    Path(project): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Result<Markup, PageError> {
    let owner: PropertiesOwner = (&state.store().project(&project).await?).into();
    render(&state, owner, &format!("Project {project}"), &q).await
}

pub async fn environment(
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    Query(q): Query<DiffQuery>,
) -> Result<Markup, PageError> {
    let owner: PropertiesOwner = (&state.store().environment(&project, &environment).await?).into();
    render(
        &state,
        owner,
        &format!("Environment {project}/{environment}"),
        &q,
    )
    .await
}

fn version_arg(
    what: &str,
    value: &Option<String>,
    history: &[PropertiesVersion],
) -> Result<Option<i64>, PageError> {
    let Some(text) = value.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let latest = history.last().map(|v| v.version).unwrap_or(0);
    text.parse::<i64>()
        .ok()
        .filter(|v| history.iter().any(|h| h.version == *v))
        .map(Some)
        .ok_or_else(|| {
            PageError::BadRequest(format!(
                "invalid {what} version {text:?}: use a version from 1 to {latest} (see the history)"
            ))
        })
}

async fn render(
    state: &AppState,
    owner: PropertiesOwner,
    title: &str,
    q: &DiffQuery,
) -> Result<Markup, PageError> {
    let history = state.store().properties_history(&owner).await?;
    let masker = masker(state.orchestrator.app())?;
    let from = version_arg("from", &q.from, &history)?;
    let to = version_arg("to", &q.to, &history)?;
    let latest = history.last().map(|v| v.version).unwrap_or(0);
    let get = |v: i64| history.iter().find(|h| h.version == v);
    let diff = match (from, to) {
        (None, None) => None,
        (from, to) => {
            let to = to.unwrap_or(latest);
            let from = from.unwrap_or((to - 1).max(1));
            let (Some(a), Some(b)) = (get(from), get(to)) else {
                return Err(PageError::BadRequest("no such versions".into()));
            };
            Some((
                from,
                to,
                changed_paths(
                    &masked_json(&masker, &a.document),
                    &masked_json(&masker, &b.document),
                ),
            ))
        }
    };
    let current = history.last();
    Ok(page(
        &format!("{title} properties"),
        html! {
            h1 { (title) " properties" }
            h2 { "Compare versions" }
            form.filters method="get" aria-label="Compare two versions" {
                div { label for="from" { "From version" }
                    select #from name="from" { @for v in &history {
                        option value=(v.version) selected[diff.as_ref().map(|d| d.0) == Some(v.version)] { (v.version) } } } }
                div { label for="to" { "To version" }
                    select #to name="to" { @for v in &history {
                        option value=(v.version) selected[diff.as_ref().map(|d| d.1).unwrap_or(latest) == v.version] { (v.version) } } } }
                button #compare type="submit" { "Compare" }
            }
            @if let Some((from, to, changes)) = &diff {
                section #diff aria-label="Difference" {
                    (table(&format!("Changed paths from version {from} to version {to}"), changes))
                }
            }
            h2 { "Current document" @if let Some(c) = current { " (version " (c.version) ")" } }
            @if let Some(c) = current { (json_block(&masked_json(&masker, &c.document), "Current document")) }
            h2 { "History" }
            div.table-wrap { table #history {
                thead { tr { th scope="col" { "Version" } th scope="col" { "Written" } th scope="col" { "By" } th scope="col" { "Changes" } } }
                tbody { @for v in history.iter().rev() {
                    tr data-version=(v.version) {
                        td { (v.version) }
                        td { (time(&v.written_at)) }
                        td { @match &v.written_by {
                            WrittenBy::Cli => "CLI",
                            WrittenBy::Api => "API",
                            WrittenBy::Change { change_id, step_id } => {
                                "change " a href={ "/changes/" (change_id) } { code { (short(change_id)) } }
                                ", step " a href={ "/steps/" (step_id) } { code { (short(step_id)) } }
                            }
                        } }
                        td { @if v.version > 1 {
                            a href={ "?from=" (v.version - 1) "&to=" (v.version) } { "what changed" }
                        } }
                    }
                } }
            } }
        },
    ))
}
