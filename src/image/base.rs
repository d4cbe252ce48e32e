//! The base runner image: staged offline from local files (static busybox, git and its libraries, the static
//! agent) and built with BuildKit; labelled with a content key so an unchanged rebuild is skipped.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::buildkit::{self, BuildError, BuildProgress, BuildRequest, DockerEndpoint};

/// The base runner image's Dockerfile, compiled in.
pub const DOCKERFILE: &str = include_str!("../../runner-image/Dockerfile");
/// The label holding the content key of the inputs an image was built from.
pub const CONTENT_KEY_LABEL: &str = "runner.base.content-key";

/// The default `OPSCHAIN_BASE_RUNNER`.
pub fn default_reference() -> String {
    format!("runner/opschain-runner:{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    #[error("{what} not found at {path}: {fix}")]
    MissingInput {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    #[error("{path} is not a static binary: {fix}")]
    NotStatic { path: PathBuf, fix: &'static str },
    #[error("failed to stage the base image at {path}: {source}")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to build the base runner image: {0}")]
    Build(#[from] BuildError),
    #[error("the Docker daemon is unreachable: {0}")]
    Docker(String),
}

const AGENT_FIX: &str = "build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p runner-agent --release --target x86_64-unknown-linux-gnu` (tools/setup.sh does) or point RUNNER_AGENT_BIN at it";
const BUSYBOX_FIX: &str = "install Debian's busybox-static (`apt-get install busybox-static`) or point RUNNER_BUSYBOX at a static busybox";

/// The files the base image is made of.
#[derive(Debug, Clone)]
pub struct BaseImageInputs {
    pub busybox: PathBuf,
    pub agent: PathBuf,
    /// git, copied with its shared libraries; `None` leaves git out.
    pub git: Option<PathBuf>,
    /// The docker CLI, for steps with `docker: socket`; `None` leaves it out.
    pub docker_cli: Option<PathBuf>,
}

impl BaseImageInputs {
    /// `RUNNER_BUSYBOX` or `/bin/busybox`, [`locate_agent`], and the system's git and docker CLI if it has them.
    pub fn from_env() -> BaseImageInputs {
        let busybox = std::env::var_os("RUNNER_BUSYBOX")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/bin/busybox".into());
        let found = |path: &str| Some(PathBuf::from(path)).filter(|p| p.exists());
        let git = found("/usr/bin/git");
        let docker_cli = found("/usr/bin/docker");
        BaseImageInputs {
            busybox,
            agent: locate_agent(),
            git,
            docker_cli,
        }
    }
}

/// `RUNNER_AGENT_BIN`, or the static agent beside this executable's target directory, or the workspace's.
pub fn locate_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("RUNNER_AGENT_BIN") {
        return path.into();
    }
    let relative = Path::new("x86_64-unknown-linux-gnu/release/opschain-agent");
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/runner (or target/debug/deps/test-…) → target/x86_64-unknown-linux-gnu/release/…
        for dir in exe.ancestors().skip(1).take(3) {
            let candidate = dir.join(relative);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(relative)
}

/// The built (or found) base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub reference: String,
    pub image_id: String,
    /// False when an image with the same content key existed and nothing was built.
    pub built: bool,
}

fn is_static(path: &Path) -> bool {
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
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
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
fn stage_file(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
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

fn stage_link(target: &str, link: &Path) -> std::io::Result<()> {
    if std::fs::read_link(link).ok().as_deref() == Some(Path::new(target)) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::fs::create_dir_all(link.parent().expect("links have parents"))?;
    std::os::unix::fs::symlink(target, link)
}

/// Stages the root filesystem under `dir/rootfs` and returns the content key of everything in it.
pub fn stage(inputs: &BaseImageInputs, dir: &Path) -> Result<String, BaseImageError> {
    if !inputs.busybox.exists() {
        return Err(BaseImageError::MissingInput {
            what: "busybox",
            path: inputs.busybox.clone(),
            fix: BUSYBOX_FIX,
        });
    }
    if !is_static(&inputs.busybox) {
        return Err(BaseImageError::NotStatic {
            path: inputs.busybox.clone(),
            fix: BUSYBOX_FIX,
        });
    }
    if !inputs.agent.exists() {
        return Err(BaseImageError::MissingInput {
            what: "the static in-container agent",
            path: inputs.agent.clone(),
            fix: AGENT_FIX,
        });
    }
    if !is_static(&inputs.agent) {
        return Err(BaseImageError::NotStatic {
            path: inputs.agent.clone(),
            fix: AGENT_FIX,
        });
    }
    let rootfs = dir.join("rootfs");
    let stage_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BaseImageError::Stage { path, source }
    };
    let mut key = Sha256::new();
    key.update(DOCKERFILE.as_bytes());
    let mut file = |from: &Path, to: &str, mode: u32| -> Result<(), BaseImageError> {
        let dest = rootfs.join(to.trim_start_matches('/'));
        stage_file(from, &dest, mode).map_err(stage_err(&dest))?;
        key.update(to.as_bytes());
        key.update(std::fs::read(&dest).map_err(stage_err(&dest))?);
        Ok(())
    };
    file(&inputs.busybox, "/bin/busybox", 0o755)?;
    file(&inputs.agent, "/usr/bin/opschain-agent", 0o755)?;
    // Dynamic tools come with the libraries they link (git: libc, zlib, pcre2; the docker CLI: libc).
    for (tool, target) in [
        (&inputs.git, "/usr/bin/git"),
        (&inputs.docker_cli, "/usr/bin/docker"),
    ] {
        let Some(tool) = tool else { continue };
        file(tool, target, 0o755)?;
        for lib in shared_libraries(tool) {
            let target = lib.to_string_lossy().into_owned();
            file(&lib, &target, 0o755)?;
        }
    }
    let applets = std::process::Command::new(&inputs.busybox)
        .arg("--list")
        .output()
        .map_err(stage_err(&inputs.busybox))?;
    let mut links: Vec<(String, PathBuf)> = String::from_utf8_lossy(&applets.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(|a| ("/bin/busybox".to_owned(), rootfs.join("bin").join(a)))
        .collect();
    for tool in ["opschain-exec", "opschain-properties"] {
        links.push((
            "opschain-agent".to_owned(),
            rootfs.join("usr/bin").join(tool),
        ));
    }
    for (target, link) in &links {
        stage_link(target, link).map_err(stage_err(link))?;
        key.update(link.to_string_lossy().as_bytes());
        key.update(target.as_bytes());
    }
    for d in ["tmp", "opt/opschain", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(stage_err(&rootfs.join(d)))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let tmp = rootfs.join("tmp");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
            .map_err(stage_err(&tmp))?;
    }
    let passwd = dir.join("passwd");
    let content = "root:x:0:0:root:/root:/bin/sh\n";
    if std::fs::read_to_string(&passwd).ok().as_deref() != Some(content) {
        std::fs::write(&passwd, content).map_err(stage_err(&passwd))?;
    }
    let file = |from: &Path, to: &str, mode: u32| -> Result<(), BaseImageError> {
        let dest = rootfs.join(to.trim_start_matches('/'));
        stage_file(from, &dest, mode).map_err(stage_err(&dest))
    };
    file(&passwd, "/etc/passwd", 0o644)?;
    key.update(content.as_bytes());
    let dockerfile = dir.join("Dockerfile");
    if std::fs::read_to_string(&dockerfile).ok().as_deref() != Some(DOCKERFILE) {
        std::fs::write(&dockerfile, DOCKERFILE).map_err(stage_err(&dockerfile))?;
    }
    Ok(hex::encode(key.finalize()))
}

/// Builds the base image into `reference` unless an image of that name with the same content key exists.
pub async fn build_base(
    home: &Path,
    endpoint: &DockerEndpoint,
    docker: &bollard::Docker,
    inputs: &BaseImageInputs,
    reference: &str,
    progress: UnboundedSender<BuildProgress>,
    cancel: CancellationToken,
) -> Result<BaseImage, BaseImageError> {
    let dir = home.join("base-image");
    let key = stage(inputs, &dir)?;
    match docker.inspect_image(reference).await {
        Ok(image) => {
            let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
            if labels.get(CONTENT_KEY_LABEL) == Some(&key) {
                return Ok(BaseImage {
                    reference: reference.to_owned(),
                    image_id: image.id.unwrap_or_default(),
                    built: false,
                });
            }
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(BaseImageError::Docker(e.to_string())),
    }
    let request = BuildRequest {
        context_dir: dir.clone(),
        dockerfile_dir: dir.clone(),
        dockerfile_name: "Dockerfile".into(),
        labels: BTreeMap::from([(CONTENT_KEY_LABEL.to_owned(), key)]),
        tags: vec![reference.to_owned()],
        ..Default::default()
    };
    let built = buildkit::build(endpoint, request, progress, cancel).await?;
    Ok(BaseImage {
        reference: reference.to_owned(),
        image_id: built.image_id,
        built: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection_and_missing_inputs() {
        assert!(!is_static(Path::new("/usr/bin/git")), "git is dynamic");
        let dir = tempfile::tempdir().unwrap();
        let inputs = BaseImageInputs {
            busybox: dir.path().join("nope"),
            agent: dir.path().join("agent"),
            git: None,
            docker_cli: None,
        };
        let err = stage(&inputs, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("busybox not found") && err.contains("busybox-static"),
            "{err}"
        );
        let inputs = BaseImageInputs {
            busybox: "/usr/bin/git".into(),
            ..inputs
        };
        let err = stage(&inputs, dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a static binary"), "{err}");
    }
}
