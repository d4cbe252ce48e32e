//! Staging a root filesystem from this machine's files, for images built without a registry: binaries with the
//! shared libraries they load, copied so that an unchanged input keeps its bytes and mtime (what BuildKit's file
//! sync compares, so its cache hits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::buildkit::{self, BuildError, BuildProgress, BuildRequest, DockerEndpoint};

/// The label holding the content key of the inputs an image was built from.
pub const CONTENT_KEY_LABEL: &str = "runner.base.content-key";

#[derive(Debug, thiserror::Error)]
pub enum OfflineImageError {
    #[error("{what} not found at {path}: {fix}")]
    MissingInput {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    #[error("{path} is not a static binary: {fix}")]
    NotStatic { path: PathBuf, fix: &'static str },
    #[error("failed to stage an image's files at {path}: {source}")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to build the image {reference}: {source}")]
    Build {
        reference: String,
        #[source]
        source: BuildError,
    },
    #[error("the Docker daemon is unreachable: {0}")]
    Docker(String),
    #[error("the image {image:?} is not in the Docker Engine: nothing is pulled, so bring it in first (`docker pull {image}` where a registry is reachable, or `docker import` a root filesystem, e.g. one made by debootstrap) and check `docker images`")]
    SourceMissing { image: String },
    #[error("invalid {what} {reference:?}: {message}")]
    InvalidReference {
        what: &'static str,
        reference: String,
        message: String,
    },
    #[error("the image {image:?} has no usable POSIX shell at /bin/sh ({detail}): steps run their `run` strings and Dockerfile RUN lines with /bin/sh, so pick an image that has one (dash, bash or busybox at /bin/sh), or add one to it first")]
    NoShell { image: String, detail: String },
}

/// An image built (or found) from a staged directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineImage {
    pub reference: String,
    pub image_id: String,
    /// False when an image with the same content key existed and nothing was built.
    pub built: bool,
}

/// Builds `dir` (its `Dockerfile` and files) into `reference`, unless an image of that name carries `key` already.
/// `labels` go on the image beside the content key.
#[allow(clippy::too_many_arguments)]
pub async fn build_if_changed(
    endpoint: &DockerEndpoint,
    docker: &bollard::Docker,
    dir: &Path,
    key: &str,
    reference: &str,
    mut labels: BTreeMap<String, String>,
    progress: UnboundedSender<BuildProgress>,
    cancel: CancellationToken,
) -> Result<OfflineImage, OfflineImageError> {
    match docker.inspect_image(reference).await {
        Ok(image) => {
            let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
            if labels.get(CONTENT_KEY_LABEL).map(String::as_str) == Some(key) {
                return Ok(OfflineImage {
                    reference: reference.to_owned(),
                    image_id: image.id.unwrap_or_default(),
                    built: false,
                });
            }
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(OfflineImageError::Docker(e.to_string())),
    }
    let request = BuildRequest {
        context_dir: dir.to_owned().into(),
        dockerfile_dir: dir.to_owned().into(),
        dockerfile_name: "Dockerfile".into(),
        labels: {
            labels.insert(CONTENT_KEY_LABEL.to_owned(), key.to_owned());
            labels
        },
        tags: vec![reference.to_owned()],
        ..Default::default()
    };
    let built = buildkit::build(endpoint, request, progress, cancel)
        .await
        .map_err(|source| OfflineImageError::Build {
            reference: reference.to_owned(),
            source,
        })?;
    Ok(OfflineImage {
        reference: reference.to_owned(),
        image_id: built.image_id,
        built: true,
    })
}

/// Whether `path` is an ELF executable without a dynamic loader.
pub fn is_static(path: &Path) -> bool {
    // A dynamic ELF names its interpreter in a PT_INTERP program header.
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        at + 4 > bytes.len() || u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) != 3
    })
}

/// Shared libraries `binary` loads, as `ldd` reports them (the dynamic loader included).
pub fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("ldd").arg(binary).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `from` to `to` unless the bytes are already there, keeping `from`'s mtime (what BuildKit compares).
pub fn stage_file(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bytes = std::fs::read(from)?;
    if std::fs::read(to).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::create_dir_all(to.parent().expect("staged files have parents"))?;
        let _ = std::fs::remove_file(to);
        std::fs::write(to, &bytes)?;
        let mtime = std::fs::metadata(from)?.modified()?;
        std::fs::File::options()
            .write(true)
            .open(to)?
            .set_modified(mtime)?;
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
}

pub fn stage_link(target: &str, link: &Path) -> std::io::Result<()> {
    if std::fs::read_link(link).ok().as_deref() == Some(Path::new(target)) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::fs::create_dir_all(link.parent().expect("links have parents"))?;
    std::os::unix::fs::symlink(target, link)
}
