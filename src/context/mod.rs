//! The build context of a step image: `repo.tar`, `step_context_env.json` and the Dockerfile (the repository's
//! `.opschain/Dockerfile` if it has one, else the default), plus the build args. [`plan`] decides what goes in
//! (pure, golden-tested); [`write`] puts a plan on disk with stable mtimes so BuildKit's file sync sends nothing
//! the second time.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache::files;
use crate::properties::{env_vars, OpschainError};

mod owner;
pub use owner::repo_tar_for_user;

/// The default step runner Dockerfile, compiled in.
pub const DEFAULT_DOCKERFILE: &str = include_str!("../../dockerfiles/Dockerfile");

/// Where the repository's own Dockerfile lives.
pub const REPOSITORY_DOCKERFILE: &str = ".opschain/Dockerfile";

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("invalid opschain.env for the step image: {0}")]
    Env(#[from] OpschainError),
    #[error("invalid base image user {user:?}: expected a numeric uid:gid (the image's runner.base.user label; rebuild it with `runner image build-base --from`)")]
    User { user: String },
    #[error("{path} exists already: pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("failed to write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a plan is made from.
#[derive(Debug, Clone)]
pub struct ContextInputs<'a> {
    /// `.opschain/Dockerfile` at the change's SHA, if the repository has one.
    pub repository_dockerfile: Option<&'a [u8]>,
    /// The merged properties of the step (repository < project < environment).
    pub properties: &'a Value,
    /// The `context` values: project, environment, change (no step: the image is shared by a change's steps).
    pub context: &'a Value,
    pub git_rev: &'a str,
    pub git_sha: &'a str,
    pub base_runner: &'a str,
    /// The numeric `uid:gid` the base image's steps run as (its `runner.base.user` label; `0:0` without one).
    pub runner_user: &'a str,
}

/// Which Dockerfile a plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DockerfileSource {
    Repository,
    Default,
}

/// Everything of a build context but `repo.tar` itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContextPlan {
    pub dockerfile_source: DockerfileSource,
    #[serde(with = "text")]
    pub dockerfile: Vec<u8>,
    #[serde(with = "text")]
    pub step_context_env: Vec<u8>,
    pub build_args: BTreeMap<String, String>,
}

mod text {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(bytes))
    }
}

/// `step_context_env.json`: the `opschain.env` variables of the merged properties and the context values. Never
/// secrets: those reach the build only through the secret mount.
pub fn step_context_env(properties: &Value, context: &Value) -> Result<Value, OpschainError> {
    let env: serde_json::Map<String, Value> = env_vars(properties)?
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(json!({ "env": env, "context": context }))
}

/// The build arguments every image built from a change's commit gets (step images and service images alike).
/// `OPSCHAIN_RUNNER_USER` is who the base image's steps run as, so a Dockerfile can give them the repository
/// (`ADD --chown=${OPSCHAIN_RUNNER_USER} repo.tar /opt/opschain/`).
pub fn build_args(
    git_rev: &str,
    git_sha: &str,
    base_runner: &str,
    runner_user: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("GIT_REV".to_owned(), git_rev.to_owned()),
        ("GIT_SHA".to_owned(), git_sha.to_owned()),
        ("OPSCHAIN_BASE_RUNNER".to_owned(), base_runner.to_owned()),
        ("OPSCHAIN_RUNNER_USER".to_owned(), runner_user.to_owned()),
        (
            "OPSCHAIN_VERSION".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

/// Decides the context's files and build args.
pub fn plan(inputs: &ContextInputs) -> Result<ContextPlan, ContextError> {
    let (dockerfile_source, dockerfile) = match inputs.repository_dockerfile {
        Some(bytes) => (DockerfileSource::Repository, bytes.to_vec()),
        None => (
            DockerfileSource::Default,
            DEFAULT_DOCKERFILE.as_bytes().to_vec(),
        ),
    };
    let env = step_context_env(inputs.properties, inputs.context)?;
    let mut step_context_env = serde_json::to_vec_pretty(&env).expect("a Value serialises");
    step_context_env.push(b'\n');
    let build_args = build_args(
        inputs.git_rev,
        inputs.git_sha,
        inputs.base_runner,
        inputs.runner_user,
    );

    Ok(ContextPlan {
        dockerfile_source,
        dockerfile,
        step_context_env,
        build_args,
    })
}

/// A plan on disk: the directories the build session serves as `context` and `dockerfile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenContext {
    pub context_dir: PathBuf,
    pub dockerfile_dir: PathBuf,
}

/// Writes `plan` under `dir` (`context/` with a hard link to `repo_tar`, `dockerfile/`). Files are only rewritten
/// when their bytes change and always get `mtime`, so an unchanged context looks unchanged to BuildKit. Safe to run
/// concurrently for one `dir`: everything is put in place by renaming a unique temporary, and nothing is ever
/// written through a link to the cached `repo_tar`.
pub fn write(
    plan: &ContextPlan,
    repo_tar: &Path,
    dir: &Path,
    mtime: std::time::SystemTime,
) -> Result<WrittenContext, ContextError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ContextError::Io { path, source }
    };
    let context_dir = dir.join("context");
    let dockerfile_dir = dir.join("dockerfile");
    for d in [&context_dir, &dockerfile_dir] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let tar = context_dir.join("repo.tar");
    if !holds_repo_tar(&tar, repo_tar, mtime) {
        link_repo_tar(repo_tar, &tar, mtime).map_err(io(&tar))?;
    }
    write_stable(
        &context_dir.join("step_context_env.json"),
        &plan.step_context_env,
        mtime,
    )?;
    write_stable(&dockerfile_dir.join("Dockerfile"), &plan.dockerfile, mtime)?;
    Ok(WrittenContext {
        context_dir,
        dockerfile_dir,
    })
}

/// Whether `tar` already is `repo_tar` (a hard link to it) or, across filesystems, a complete copy of it.
fn holds_repo_tar(tar: &Path, repo_tar: &Path, mtime: std::time::SystemTime) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(have), Ok(cached)) = (std::fs::metadata(tar), std::fs::metadata(repo_tar)) else {
        return false;
    };
    let same_inode = have.dev() == cached.dev() && have.ino() == cached.ino();
    let complete_copy = have.dev() != cached.dev()
        && have.len() == cached.len()
        && have.modified().ok() == Some(mtime);
    same_inode || complete_copy
}

/// Puts `repo_tar` at `tar`: a hard link (it shares the cached file's inode, hence its size and mtime) or, across
/// filesystems, a copy — always made under a unique temporary name and renamed into place, so the copy can never
/// write through a link to the cached file (which would truncate the cache under a concurrent reader).
fn link_repo_tar(repo_tar: &Path, tar: &Path, mtime: std::time::SystemTime) -> std::io::Result<()> {
    let dir = tar
        .parent()
        .expect("repo.tar lives in the context directory");
    let tmp = files::temporary(dir, "repo.tar");
    let made = match std::fs::hard_link(repo_tar, &tmp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => std::fs::copy(repo_tar, &tmp)
            .and_then(|_| {
                std::fs::File::options()
                    .write(true)
                    .open(&tmp)?
                    .set_modified(mtime)
            }),
        Err(e) => Err(e),
    };
    let placed = made.and_then(|()| std::fs::rename(&tmp, tar));
    // Also after a successful rename: when a concurrent writer already linked the same inode at `tar`, rename(2)
    // of one hard link onto another of the same file does nothing and leaves `tmp` behind.
    let _ = std::fs::remove_file(&tmp);
    placed
}

/// Writes `bytes` as `dir/Dockerfile` (creating `dir`) the way [`write`] does: rewritten only when they change,
/// always with `mtime`.
pub fn write_dockerfile(
    dir: &Path,
    bytes: &[u8],
    mtime: std::time::SystemTime,
) -> Result<(), ContextError> {
    std::fs::create_dir_all(dir).map_err(|source| ContextError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_stable(&dir.join("Dockerfile"), bytes, mtime)
}

fn write_stable(
    path: &Path,
    bytes: &[u8],
    mtime: std::time::SystemTime,
) -> Result<(), ContextError> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    files::write_atomically(path, bytes, Some(mtime)).map_err(|source| ContextError::Io {
        path: path.to_owned(),
        source,
    })
}

/// `runner dev create-dockerfile`: writes the default Dockerfile to `.opschain/Dockerfile` of `repo_dir`.
pub fn write_default_dockerfile(repo_dir: &Path, force: bool) -> Result<PathBuf, ContextError> {
    let path = repo_dir.join(REPOSITORY_DOCKERFILE);
    if path.exists() && !force {
        return Err(ContextError::Exists { path });
    }
    let parent = path.parent().expect("a path with a parent");
    std::fs::create_dir_all(parent).map_err(|source| ContextError::Io {
        path: parent.to_owned(),
        source,
    })?;
    std::fs::write(&path, DEFAULT_DOCKERFILE).map_err(|source| ContextError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
