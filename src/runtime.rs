//! Assembles the real components — git mirrors, the BuildKit image builder, the Docker executor — into an
//! [`Orchestrator`] for the CLI and the server.

use std::sync::Arc;

use crate::app::App;
use crate::buildkit::DockerEndpoint;
use crate::error::{Error, Result};
use crate::executor::docker::{self, DockerExecutor};
use crate::image::base;
use crate::image::step::BuildKitImages;
use crate::orchestrator::{Orchestrator, Settings};
use crate::snapshot::GitSources;

/// The base runner image steps build `FROM`: `RUNNER_BASE_IMAGE` or the locally built default.
pub fn base_image() -> String {
    std::env::var("RUNNER_BASE_IMAGE").unwrap_or_else(|_| base::default_reference())
}

/// Settings from the environment: `RUNNER_STOP_GRACE` (e.g. `10s`) and the log limits
/// ([`crate::logs::LogLimits::from_env`]); a value that does not parse is an error naming the variable, not
/// silently the default.
pub fn settings() -> Result<Settings> {
    let mut settings = Settings {
        logs: crate::logs::LogLimits::from_env()?,
        ..Settings::default()
    };
    if let Ok(grace) = std::env::var("RUNNER_STOP_GRACE") {
        settings.stop_grace =
            crate::actions::parse_duration(&grace).map_err(|_| Error::InvalidArgument {
                what: "RUNNER_STOP_GRACE",
                value: grace,
                expected: "give a duration such as 10s, 2m or 1h, at most 8760h",
            })?;
    }
    Ok(settings)
}

/// Connect and no-data timeout of git fetches: `RUNNER_GIT_TIMEOUT` (e.g. `30s`), default 60s; a value that is
/// not a duration is an error.
pub fn git_timeout() -> Result<std::time::Duration> {
    match std::env::var("RUNNER_GIT_TIMEOUT") {
        Ok(timeout) => {
            crate::actions::parse_duration(&timeout).map_err(|_| Error::InvalidArgument {
                what: "RUNNER_GIT_TIMEOUT",
                value: timeout,
                expected: "give a duration such as 30s or 5m",
            })
        }
        Err(_) => Ok(crate::snapshot::remote::DEFAULT_TIMEOUT),
    }
}

fn assemble(app: App, docker: bollard::Docker, settings: Settings) -> Result<Orchestrator> {
    let images = BuildKitImages::new(
        app.home.clone(),
        DockerEndpoint::from_env(),
        docker.clone(),
        base_image(),
    );
    let sources = GitSources {
        home: app.home.clone(),
        policy: app.policy.clone(),
        timeout: git_timeout()?,
    };
    Ok(Orchestrator::new(
        app,
        Arc::new(sources),
        Arc::new(images),
        Arc::new(DockerExecutor::new(docker)),
        settings,
    ))
}

/// An orchestrator on the local Docker daemon; fails if the daemon does not answer.
pub async fn local(app: App) -> Result<Orchestrator> {
    local_as(app, None).await
}

/// [`local`], acting as runner process `owner` if given (a background `change run` continues as the owner its
/// change was created for).
pub async fn local_as(app: App, owner: Option<String>) -> Result<Orchestrator> {
    let settings = settings()?;
    let budget = crate::cache::budget::parse(
        std::env::var(crate::cache::budget::VARIABLE)
            .ok()
            .as_deref(),
    )
    .map_err(|_| Error::InvalidArgument {
        what: crate::cache::budget::VARIABLE,
        value: std::env::var(crate::cache::budget::VARIABLE).unwrap_or_default(),
        expected: "give a size such as 20GiB, 500MiB or 10G",
    })?;
    let mut orchestrator = assemble(app, docker::connect().await?, settings)?;
    if let Some(owner) = owner {
        orchestrator = orchestrator.with_owner(owner);
    }
    // Whatever a crashed runner left behind goes first; then logs past the operator's retention.
    let reaped = orchestrator.reap().await?;
    if reaped != Default::default() {
        tracing::warn!(
            changes = ?reaped.changes,
            removed = reaped.containers,
            "start-up clean-up: ended the changes of runners that died and removed what they left"
        );
    }
    if let Some(budget) = budget {
        // Over its budget, the cache gives up its least recently written files no unfinished change uses.
        let app = orchestrator.app();
        let used = crate::cache::prune::in_use(&app.store).await?;
        match crate::cache::budget::prune_to_budget(&app.home, &used, budget) {
            Ok(pruned) if !pruned.is_empty() => tracing::info!(
                removed = pruned.len(),
                bytes = pruned.iter().map(|p| p.bytes).sum::<u64>(),
                budget,
                "the cache was over its budget ({})",
                crate::cache::budget::VARIABLE
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the cache to its budget failed"),
        }
    }
    if let Some(retention) = orchestrator.settings().logs.retention {
        crate::logs::retention::prune_older_than(&orchestrator.app().store, retention).await?;
    }
    Ok(orchestrator)
}

/// An orchestrator for commands that touch only the store (e.g. cancel): no daemon is contacted.
pub fn offline(app: App) -> Result<Orchestrator> {
    let docker = bollard::Docker::connect_with_local_defaults()
        .map_err(|e| crate::executor::ExecutorError::Unavailable(e.to_string()))?;
    assemble(app, docker, settings()?)
}

/// An orchestrator for `runner serve`, which must start without a daemon: nothing is contacted, and a unix
/// socket that does not exist yet is fine (every request connects anew, so a daemon started later is found).
/// The server's health follows the daemon from then on.
pub fn serving(app: App) -> Result<Orchestrator> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    let docker = match host.strip_prefix("unix://") {
        Some(path) => docker::unix_client(path),
        None if host.is_empty() => docker::unix_client("/var/run/docker.sock"),
        None => bollard::Docker::connect_with_local_defaults()
            .map_err(|e| crate::executor::ExecutorError::Unavailable(e.to_string())),
    }?;
    assemble(app, docker, settings()?)
}
