//! One step: its facts (state, exit code, image reference, cached or built, duration), its phases, its log and
//! its services' logs (following live while it runs), the properties it started from and the patches it
//! returned (the property versions it wrote, as changed paths).

use axum::extract::{Path, State};
use maud::{html, Markup};

use super::super::error::PageError;
use super::super::layout::{badge, duration, json_block, page};
use super::super::AppState;
use super::change::short;
use super::diff::{changed_paths, table};
use super::{masked_json, masker};
use crate::events::{service_of, Event, EventRecord};
use crate::executor::Stream;
use crate::mask::Masker;
use crate::store::{PropertiesOwner, Step, Store};

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let step = store.step(&id).await?;
    let change = store.change(&step.change_id).await?;
    let masker = masker(state.orchestrator.app())?;
    let records = store.events_after(&change.id, 0).await?;
    let last_seq = records.last().map(|r| r.seq).unwrap_or(0);
    let mine: Vec<&EventRecord> = records
        .iter()
        .filter(|r| crate::logs::view::event_step(&r.event) == Some(step.id.as_str()))
        .collect();
    let patches = patches(store, &change.project, &change.environment, &step, &masker).await?;
    let live = !step.state.is_final() && !change.state.is_final();
    let has_services = mine
        .iter()
        .any(|r| matches!(&r.event, Event::Log { line, .. } if service_of(line).is_some()));
    Ok(page(
        &format!("Step {}", step.action),
        html! {
            p { a href={ "/changes/" (change.id) } { "← Change " code { (short(&change.id)) } } " · " (change.project) " / " (change.environment) }
            h1 { "Step " (step.action) }
            (facts(&step, &masker))
            h2 { "Phases" }
            ol #phases {
                @for r in &mine {
                    @if let Event::Phase { message, .. } = &r.event { li { (masker.mask(message)) } }
                }
            }
            h2 #log-heading { "Log" }
            @if live {
                p { label { input #follow type="checkbox" checked; " Follow the end of the log" } }
            }
            pre.log #log aria-labelledby="log-heading" tabindex="0"
                data-live=[live.then_some("log")]
                data-events={ "/steps/" (step.id) "/events?after=" (last_seq) } {
                @for r in &mine {
                    @if let Event::Log { stream, line, .. } = &r.event {
                        @if service_of(line).is_none() {
                            span class=(stream_class(*stream)) { (line) "\n" }
                        }
                    }
                }
            }
            h2 #service-heading { "Service logs" }
            @if live || has_services {
                pre.log #service-log aria-labelledby="service-heading" tabindex="0" {
                    @for r in &mine {
                        @if let Event::Log { stream, line, .. } = &r.event {
                            @if service_of(line).is_some() {
                                span class=(stream_class(*stream)) { (line) "\n" }
                            }
                        }
                    }
                }
            } @else {
                p.muted { "None: the step ran no services." }
            }
            h2 { "Properties it started from" }
            @match &step.properties {
                Some(p) => (json_block(&masked_json(&masker, p), "Properties the step started from")),
                None => p.muted { "Not known yet (the step has not started, or is a group of steps)." },
            }
            h2 { "Patches it returned" }
            @if patches.is_empty() {
                p.muted { "None." }
            } @else {
                @for p in &patches { (p) }
            }
        },
    ))
}

/// The facts alone (what the page fetches when the step ends).
pub async fn facts_part(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let step = state.store().step(&id).await?;
    let masker = masker(state.orchestrator.app())?;
    Ok(facts(&step, &masker))
}

fn facts(step: &Step, masker: &Masker) -> Markup {
    html! {
        dl.facts #step-facts data-state=(step.state.as_str()) data-src={ "/steps/" (step.id) "/facts" } {
            dt { "State" } dd { (badge(step.state.as_str())) }
            @if let Some(code) = step.exit_code { dt { "Exit code" } dd.exit { (code) } }
            @if let Some(reason) = &step.reason { dt { "Reason" } dd { (masker.mask(reason)) } }
            @if let Some(took) = duration(step.started_at.as_deref(), step.finished_at.as_deref()) {
                dt { "Took" } dd { (took) }
            }
            @if let Some(image) = &step.image_id {
                dt { "Image" } dd { code { (image) } " "
                    @match step.image_cached { Some(true) => "(cached)", Some(false) => "(built)", None => "" } }
            }
            @if let Some(strategy) = &step.children_strategy { dt { "Children" } dd { (strategy) } }
        }
    }
}

pub fn stream_class(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// Each property version the step wrote, as the paths it changed from the version before.
async fn patches(
    store: &Store,
    project: &str,
    environment: &str,
    step: &Step,
    masker: &Masker,
) -> Result<Vec<Markup>, PageError> {
    let mut out = vec![];
    for written in store.versions_written_by(&step.id).await? {
        let (owner, label): (PropertiesOwner, String) = if written.owner_kind == "project" {
            (
                (&store.project(project).await?).into(),
                format!("project {project}"),
            )
        } else {
            (
                (&store.environment(project, environment).await?).into(),
                format!("environment {project}/{environment}"),
            )
        };
        let after = store.properties(&owner, Some(written.version)).await?;
        let before = match written.version {
            1 => serde_json::json!({}),
            v => store.properties(&owner, Some(v - 1)).await?.document,
        };
        let changes = changed_paths(
            &masked_json(masker, &before),
            &masked_json(masker, &after.document),
        );
        let href = if written.owner_kind == "project" {
            format!("/projects/{project}/properties")
        } else {
            format!("/projects/{project}/environments/{environment}/properties")
        };
        out.push(html! {
            section.patch {
                h3 { a href=(href) { (label) } ", version " (written.version - 1) " → " (written.version) }
                (table(&format!("{label}: version {} to {}", written.version - 1, written.version), &changes))
            }
        });
    }
    Ok(out)
}
