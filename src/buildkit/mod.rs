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

/// One image build.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// Served as the local directory `context`.
    pub context_dir: PathBuf,
    /// Served as the local directory `dockerfile`.
    pub dockerfile_dir: PathBuf,
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
