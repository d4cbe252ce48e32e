//! Drives the Docker Engine's embedded BuildKit directly: serves the build session (files, secrets) over the
//! daemon's `/session` endpoint ([`session`]) and calls `Control.Solve` / `Control.Status` over its `/grpc` endpoint
//! ([`solve`]), turning status into typed [`BuildProgress`]. No docker CLI, no context tarball upload: unchanged
//! files cost one STAT packet, so a cache hit is nearly free.

mod conn;
mod filesync;
mod session;
mod solve;

pub use conn::DockerEndpoint;
pub use solve::build;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::snapshot::{PathError, SnapshotDir};

/// A local directory a build session serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDir {
    /// A directory the runner wrote itself (in its cache): served as it is.
    Own(PathBuf),
    /// `path` inside the unpacked repository snapshot `root`, which comes from the repository: resolved beneath
    /// `root`, never through a symlink or `..` out of it.
    Beneath {
        root: PathBuf,
        path: String,
        /// What the path is, for errors (e.g. "build context").
        what: &'static str,
    },
}

impl Default for LocalDir {
    fn default() -> LocalDir {
        LocalDir::Own(PathBuf::new())
    }
}

impl From<PathBuf> for LocalDir {
    fn from(path: PathBuf) -> LocalDir {
        LocalDir::Own(path)
    }
}

impl From<&std::path::Path> for LocalDir {
    fn from(path: &std::path::Path) -> LocalDir {
        LocalDir::Own(path.to_owned())
    }
}

impl LocalDir {
    /// A handle on the directory; everything the session serves is read through it.
    pub fn open(&self) -> Result<cap_std::fs::Dir, PathError> {
        match self {
            LocalDir::Own(path) => {
                cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority()).map_err(
                    |source| PathError::Io {
                        what: "the build directory",
                        path: ".".into(),
                        root: path.clone(),
                        source,
                    },
                )
            }
            LocalDir::Beneath { root, path, what } => SnapshotDir::open(root)?.dir(what, path),
        }
    }

    /// Names the directory stably across builds (BuildKit's shared key for its file sync cache).
    fn key(&self) -> String {
        match self {
            LocalDir::Own(path) => path.to_string_lossy().into_owned(),
            LocalDir::Beneath { root, path, .. } => format!("{}//{path}", root.display()),
        }
    }
}

/// One image build.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// Served as the local directory `context`.
    pub context_dir: LocalDir,
    /// Served as the local directory `dockerfile`.
    pub dockerfile_dir: LocalDir,
    pub dockerfile_name: String,
    pub build_args: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Image names to tag the result with.
    pub tags: Vec<String>,
    /// Secret id → bytes, for `RUN --mount=type=secret,id=…`. Their values are masked in everything emitted.
    pub secrets: BTreeMap<String, Vec<u8>>,
}

/// The built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// `sha256:…`
    pub image_id: String,
}

/// Build progress, as BuildKit reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildProgress {
    VertexStarted {
        digest: String,
        name: String,
    },
    VertexCompleted {
        digest: String,
        name: String,
        cached: bool,
        error: Option<String>,
        duration: Duration,
    },
    Log {
        digest: String,
        line: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the Docker daemon at {endpoint} is unreachable: {message} (is dockerd running? see tools/setup.sh)")]
    DaemonUnreachable { endpoint: String, message: String },
    #[error("the Dockerfile is invalid: {message}")]
    Dockerfile {
        message: String,
        log_tail: Vec<String>,
    },
    #[error("the base image is missing: {message} (no registry can be reached: build it locally, e.g. `runner image build-base`)")]
    BaseImageMissing { message: String },
    #[error("build step {vertex:?} failed: {message}{}", tail(log_tail))]
    StepFailed {
        vertex: String,
        message: String,
        log_tail: Vec<String>,
    },
    #[error("the build failed: {message}{}", tail(log_tail))]
    Failed {
        message: String,
        log_tail: Vec<String>,
    },
    #[error("the build was cancelled")]
    Cancelled,
    #[error(transparent)]
    Path(#[from] PathError),
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n  {}", lines.join("\n  "))
    }
}

/// Replaces secret values with `***`.
pub(crate) fn mask(secrets: &BTreeMap<String, Vec<u8>>, text: &str) -> String {
    let values: Vec<String> = secrets
        .values()
        .flat_map(|v| {
            let text = String::from_utf8_lossy(v).into_owned();
            // An env-file secret: mask each value, not just the whole file.
            let mut parts: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    l.split_once('=')
                        .map(|(_, v)| v.trim_matches('"').to_owned())
                })
                .collect();
            parts.push(text);
            parts
        })
        .collect();
    crate::mask::Masker::new(values.iter().map(|v| v.trim()).filter(|v| v.len() >= 3)).mask(text)
}
