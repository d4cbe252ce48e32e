//! [`Sources`] over git mirrors: what the orchestrator reads repositories through, and the one place a project's
//! remote access (granted credential, operator trust anchors, timeout) is assembled for a fetch.

use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::remote::{self, Credential, RemoteAccess, Trust};
use super::{mirror_path, FetchProblem, Mirror, SnapshotError};
use crate::error::Result;
use crate::orchestrator::Sources;
use crate::policy::Policy;
use crate::secrets::SecretStore;
use crate::store::Project;

/// Mirrors under `<home>/repos`.
#[derive(Debug, Clone)]
pub struct GitSources {
    pub home: PathBuf,
    /// Which credential secrets the operator granted.
    pub policy: Arc<Policy>,
    /// Connect and no-data timeout of fetches (`RUNNER_GIT_TIMEOUT`).
    pub timeout: Duration,
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

/// What a fetch of `project` may use: the credential secret its admins named — only if the operator granted it to
/// the whole project (all environments share one mirror) — and the operator's `known_hosts` and CA bundle.
pub fn remote_access(
    home: &Path,
    policy: &Policy,
    project: &Project,
    timeout: Duration,
) -> Result<RemoteAccess> {
    let credential = match (&project.git_credential, &project.git_remote) {
        (Some(name), Some(url)) => {
            // The mirror serves every environment of the project: only a grant without `environment` covers it.
            if !policy.secret_granted(&project.code, "", name) {
                return Err(remote::RemoteError::CredentialNotGranted {
                    secret: name.clone(),
                    project: project.code.clone(),
                    policy: policy.path().display().to_string(),
                }
                .into());
            }
            let values = SecretStore::open(home)?.get(name)?;
            let parsed = remote::parse_url(url)?;
            Some((
                name.clone(),
                Credential::from_secret(name, &values, url, &parsed)?,
            ))
        }
        _ => None,
    };
    Ok(RemoteAccess {
        credential,
        trust: Some(Trust::in_home(home)),
        timeout,
    })
}

/// Sets the flag when dropped: a caller that stops waiting (a cancelled request, a timeout) stops the transfer.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Fetches the project's mirror with its remote access on a blocking thread. Dropping the future cancels the
/// transfer; a fetch that shows no progress for the timeout is abandoned with a timeout error (libgit2 gives up on
/// a silent HTTP(S) socket by itself; an SSH session that hangs is left to finish on its thread).
pub fn fetch_mirror(
    home: &Path,
    policy: &Policy,
    project: &Project,
    timeout: Duration,
) -> BoxFuture<'static, Result<()>> {
    let path = mirror_path(home, &project.code);
    let access = remote_access(home, policy, project, timeout);
    let project = project.clone();
    async move {
        let remote = project.git_remote.clone().ok_or(SnapshotError::NoRemote {
            project: project.code.clone(),
        })?;
        let access = access?;
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        let started = Instant::now();
        let progress = Arc::new(AtomicU64::new(0));
        let mut task = tokio::task::spawn_blocking({
            let (cancel, progress) = (cancel.clone(), progress.clone());
            move || {
                let mirror = Mirror::open(&path, &remote)?;
                mirror.fetch_watched(&access, &cancel, &|| {
                    progress.store(started.elapsed().as_millis() as u64, Ordering::Relaxed)
                })
            }
        });
        loop {
            match tokio::time::timeout(Duration::from_millis(250), &mut task).await {
                Ok(joined) => return Ok(joined.expect("git work does not panic")?),
                Err(_) => {
                    let idle = started
                        .elapsed()
                        .saturating_sub(Duration::from_millis(progress.load(Ordering::Relaxed)));
                    // libgit2's own socket timeouts fire first; this catches what they do not cover.
                    if idle > timeout + Duration::from_secs(5) {
                        cancel.store(true, Ordering::Relaxed);
                        let transport = remote::parse_url(&remote_of(&project))?.transport;
                        return Err(SnapshotError::Fetch {
                            remote: remote_of(&project),
                            transport,
                            problem: Box::new(FetchProblem::Timeout { after: timeout }),
                        }
                        .into());
                    }
                }
            }
        }
    }
    .boxed()
}

fn remote_of(project: &Project) -> String {
    project.git_remote.clone().unwrap_or_default()
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
        async move {
            fetch_mirror(&self.home, &self.policy, project, self.timeout).await?;
            self.with_mirror(project, move |mirror| mirror.resolve(&rev))
                .await
        }
        .boxed()
    }

    fn have_commit<'a>(&'a self, project: &'a Project, sha: &'a str) -> BoxFuture<'a, Result<()>> {
        let sha = sha.to_owned();
        async move {
            let here = self
                .with_mirror(project, move |mirror| mirror.resolve(&sha).map(|_| ()))
                .await;
            if here.is_err() {
                fetch_mirror(&self.home, &self.policy, project, self.timeout).await?;
            }
            Ok(())
        }
        .boxed()
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
