//! [`Sources`] over git mirrors: what the orchestrator reads repositories through.

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::{mirror_path, Mirror, SnapshotError};
use crate::error::Result;
use crate::orchestrator::Sources;
use crate::store::Project;

/// Mirrors under `<home>/repos`.
#[derive(Debug, Clone)]
pub struct GitSources {
    pub home: PathBuf,
}

/// Runs `work` on the project's mirror under `home` on a blocking thread (git2 is synchronous).
pub fn on_mirror<T: Send + 'static>(
    home: &Path,
    project: &Project,
    work: impl FnOnce(&Mirror) -> std::result::Result<T, SnapshotError> + Send + 'static,
) -> BoxFuture<'static, Result<T>> {
    let path = mirror_path(home, &project.code);
    let remote = project.git_remote.clone();
    let code = project.code.clone();
    async move {
        let remote = remote.ok_or(SnapshotError::NoRemote { project: code })?;
        let done = tokio::task::spawn_blocking(move || work(&Mirror::open(&path, &remote)?))
            .await
            .expect("git work does not panic")?;
        Ok(done)
    }
    .boxed()
}

impl GitSources {
    fn with_mirror<T: Send + 'static>(
        &self,
        project: &Project,
        work: impl FnOnce(&Mirror) -> std::result::Result<T, SnapshotError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T>> {
        on_mirror(&self.home, project, work)
    }
}

impl Sources for GitSources {
    fn resolve<'a>(&'a self, project: &'a Project, rev: &'a str) -> BoxFuture<'a, Result<String>> {
        let rev = rev.to_owned();
        self.with_mirror(project, move |mirror| {
            mirror.fetch()?;
            mirror.resolve(&rev)
        })
    }

    fn read_file<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        let (sha, path) = (sha.to_owned(), path.to_owned());
        self.with_mirror(project, move |mirror| mirror.read_file(&sha, &path))
    }

    fn repository_properties<'a>(
        &'a self,
        project: &'a Project,
        sha: &'a str,
        environment: &'a str,
    ) -> BoxFuture<'a, Result<Value>> {
        let (sha, environment) = (sha.to_owned(), environment.to_owned());
        self.with_mirror(project, move |mirror| {
            mirror.repository_properties(&sha, &environment)
        })
    }
}
