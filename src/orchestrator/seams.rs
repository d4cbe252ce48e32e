//! The ports the orchestrator drives: where repositories come from ([`Sources`]) and who builds step images
//! ([`StepImages`]), with their request types. The executor's port lives in `crate::executor`.

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::step_context::StepIdentity;
use crate::actions::ServiceBuild;
use crate::error::Result;
use crate::secrets::SecretValues;
use crate::store::Project;

/// Sends events and output of one change run (or one single step) to the log pipeline.
pub use crate::logs::EventTx;

/// Where projects' repositories come from: resolving revisions and reading files at a commit.
pub trait Sources: Send + Sync {
    /// Brings the project's repository up to date and resolves `rev` to a full commit SHA.
    fn resolve<'a>(&'a self, project: &'a Project, rev: &'a str) -> BoxFuture<'a, Result<String>>;
    /// A file of the tree at `sha`, if it exists.
    fn read_file<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>>>;
    /// The repository's properties at `sha` for an environment: `.opschain/properties.*` deep-merged with
    /// `.opschain/environments/<env>.*`.
    fn repository_properties<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        environment: &'a str,
    ) -> BoxFuture<'a, Result<Value>>;
    /// Makes sure the commit `sha` can be read here: a worker of a fleet runs changes another host resolved, so
    /// its copy of the repository may not have that commit yet. Sources that hold every commit need do nothing.
    fn have_commit<'a>(&'a self, project: &'a Project, sha: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = (project, sha);
        Box::pin(async { Ok(()) })
    }
}

/// What a step's image is built for.
#[derive(Debug, Clone, Copy)]
pub struct ImageRequest<'a> {
    pub identity: StepIdentity<'a>,
    /// The merged properties the step sees (for `step_context_env.json`).
    pub properties: &'a Value,
    pub build_secrets: &'a SecretValues,
    /// The base runner image set for the project or environment; `None` uses the operator's default.
    pub base_image: Option<&'a str>,
}

/// A step's image, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    pub image: String,
    /// Nothing was built: an image for the same content key existed.
    pub cached: bool,
}

/// A service image to build from the repository at the change's commit.
#[derive(Debug, Clone, Copy)]
pub struct ServiceImageRequest<'a> {
    pub identity: StepIdentity<'a>,
    pub service: &'a str,
    pub build: &'a ServiceBuild,
    /// As [`ImageRequest::base_image`].
    pub base_image: Option<&'a str>,
}

/// Builds (or reuses) the images a step needs. Build progress goes to `events` as [`Event::Build`].
pub trait StepImages: Send + Sync {
    /// The image the step runs in.
    fn prepare<'a>(
        &'a self,
        request: ImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;

    /// A service's image, built from the repository at the change's commit with the same builder.
    fn prepare_service<'a>(
        &'a self,
        request: ServiceImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;

    /// The image a `docker: dind` step's daemon runs from, built offline the first time it is needed.
    fn prepare_docker_daemon<'a>(
        &'a self,
        step_id: &'a str,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>>;
}
