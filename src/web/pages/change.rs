//! One change: its facts (project, environment, action, revision and SHA), and a live region with its state,
//! the cancel and retry buttons and the step tree (sequential or parallel groups, states, durations, whether the
//! image was cached or built, exit codes), re-rendered whenever the change's events say something happened.

use axum::extract::{Extension, Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};

use super::super::auth::{check_csrf, Caller, CsrfForm};
use super::super::error::PageError;
use super::super::layout::{badge, csrf_field, duration, page, time};
use super::super::AppState;
use super::masker;
use crate::mask::Masker;
use crate::store::{Change, Step};

pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let change = store.change(&id).await?;
    let steps = store.steps(&id).await?;
    let masker = masker(state.orchestrator.app())?;
    Ok(page(
        &format!("Change {}", short(&change.id)),
        html! {
            h1 { "Change " code { (change.id) } }
            dl.facts {
                dt { "Project" } dd { a href={ "/changes?project=" (change.project) } { (change.project) } }
                dt { "Environment" } dd { a href={ "/projects/" (change.project) "/environments/" (change.environment) "/properties" } { (change.environment) } }
                dt { "Action" } dd { (change.action) }
                dt { "Revision" } dd { code { (change.git_rev) } }
                dt { "SHA" } dd { code.sha { (change.git_sha) } }
                dt { "Created" } dd { (time(&change.created_at)) }
            }
            section #live aria-live="polite" aria-label="State and steps"
                data-live=[(!change.state.is_final()).then_some("region")]
                data-src={ "/changes/" (change.id) "/live" }
                data-events={ "/changes/" (change.id) "/events" } {
                (live_part(&change, &steps, caller.csrf.as_deref(), &masker))
            }
        },
    ))
}

/// The live region alone (what the page fetches when the change's events say it moved).
pub async fn live(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let change = store.change(&id).await?;
    let steps = store.steps(&id).await?;
    let masker = masker(state.orchestrator.app())?;
    Ok(live_part(&change, &steps, caller.csrf.as_deref(), &masker))
}

fn live_part(change: &Change, steps: &[Step], csrf: Option<&str>, masker: &Masker) -> Markup {
    let retryable = matches!(
        change.state,
        crate::events::ChangeState::Error | crate::events::ChangeState::Cancelled
    );
    html! {
        dl.facts #change-state data-state=(change.state.as_str()) {
            dt { "State" } dd { (badge(change.state.as_str()))
                @if change.cancel_requested && !change.state.is_final() { " " span.muted { "(cancel requested)" } } }
            @if let Some(reason) = &change.reason { dt { "Reason" } dd { (masker.mask(reason)) } }
            @if let Some(took) = duration(change.started_at.as_deref(), change.finished_at.as_deref()) {
                dt { @if change.state.is_final() { "Took" } @else { "Running for" } } dd { (took) }
            }
        }
        div.actions {
            @if !change.state.is_final() {
                form.inline method="post" action={ "/changes/" (change.id) "/cancel" } {
                    (csrf_field(csrf))
                    button #cancel type="submit" { "Cancel change" }
                }
            }
            @if retryable {
                form.inline method="post" action={ "/changes/" (change.id) "/retry" } {
                    (csrf_field(csrf))
                    button #retry type="submit" { "Retry change" }
                }
            }
        }
        h2 { "Steps" }
        @if let Some(root) = steps.iter().find(|s| s.parent_id.is_none()) {
            ol.tree #tree aria-label="Step tree" { (step_item(root, steps, masker)) }
        }
    }
}

fn step_item(step: &Step, steps: &[Step], masker: &Masker) -> Markup {
    let mut children: Vec<&Step> = steps
        .iter()
        .filter(|s| s.parent_id.as_deref() == Some(step.id.as_str()))
        .collect();
    children.sort_by_key(|s| s.position);
    let parallel = step.children_strategy.as_deref() == Some("parallel");
    html! {
        li #{ "step-" (step.id) } data-state=(step.state.as_str()) data-action=(step.action) {
            div.step-line {
                a href={ "/steps/" (step.id) } { (step.action) }
                (badge(step.state.as_str()))
                @if let Some(took) = duration(step.started_at.as_deref(), step.finished_at.as_deref()) {
                    span.took { (took) }
                }
                @match step.image_cached {
                    Some(true) => span.image { "image cached" },
                    Some(false) => span.image { "image built" },
                    None => {},
                }
                @if let Some(code) = step.exit_code { span.exit { "exit code " (code) } }
                @if let Some(reason) = &step.reason { span.muted.reason { (masker.mask(reason)) } }
            }
            @if !children.is_empty() {
                span.group { @if parallel { "in parallel:" } @else { "in sequence:" } }
                @if parallel {
                    ul { @for c in &children { (step_item(c, steps, masker)) } }
                } @else {
                    ol { @for c in &children { (step_item(c, steps, masker)) } }
                }
            }
        }
    }
}

pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    check_csrf(&caller, &headers, &form.csrf)?;
    state.orchestrator.cancel_change(&id).await?;
    Ok(Redirect::to(&format!("/changes/{id}")).into_response())
}

pub async fn retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, PageError> {
    check_csrf(&caller, &headers, &form.csrf)?;
    let change = state.orchestrator.prepare_retry(&id).await?;
    state.start(change.id.clone());
    Ok(Redirect::to(&format!("/changes/{id}")).into_response())
}
