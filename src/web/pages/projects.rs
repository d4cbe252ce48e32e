//! The projects list and a project's environments, with links to their changes and properties.

use axum::extract::{Path, State};
use maud::{html, Markup};

use super::super::error::PageError;
use super::super::layout::{page, time};
use super::super::AppState;

pub async fn list(State(state): State<AppState>) -> Result<Markup, PageError> {
    let projects = state.store().list_projects().await?;
    Ok(page(
        "Projects",
        html! {
            h1 { "Projects" }
            @if projects.is_empty() { p { "No projects yet: create one with " code { "runner project create" } "." } }
            @else {
                div.table-wrap { table #projects {
                    thead { tr { th scope="col" { "Code" } th scope="col" { "Name" } th scope="col" .wide { "Git remote" } th scope="col" { "See" } } }
                    tbody { @for p in &projects {
                        tr {
                            td { code { (p.code) } }
                            td { (p.name) }
                            td.wide { code { (p.git_remote.as_deref().unwrap_or("")) } }
                            td {
                                a href={ "/projects/" (p.code) "/environments" } { "environments" } " · "
                                a href={ "/projects/" (p.code) "/properties" } { "properties" } " · "
                                a href={ "/changes?project=" (p.code) } { "changes" }
                            }
                        }
                    } }
                } }
            }
        },
    ))
}

pub async fn environments(
    State(state): State<AppState>,
    Path(project): Path<String>,
) -> Result<Markup, PageError> {
    let store = state.store();
    let project = store.project(&project).await?;
    let environments = store.list_environments(&project.code).await?;
    Ok(page(
        &format!("{} environments", project.code),
        html! {
            p { a href="/projects" { "← Projects" } }
            h1 { "Environments of " (project.code) }
            @if environments.is_empty() { p { "No environments yet: create one with " code { "runner environment create" } "." } }
            @else {
                div.table-wrap { table #environments {
                    thead { tr { th scope="col" { "Code" } th scope="col" { "Name" } th scope="col" .wide { "Created" } th scope="col" { "See" } } }
                    tbody { @for e in &environments {
                        tr {
                            td { code { (e.code) } }
                            td { (e.name) }
                            td.wide { (time(&e.created_at)) }
                            td {
                                a href={ "/projects/" (project.code) "/environments/" (e.code) "/properties" } { "properties" } " · "
                                a href={ "/changes?project=" (project.code) "&environment=" (e.code) } { "changes" }
                            }
                        }
                    } }
                } }
            }
        },
    ))
}
