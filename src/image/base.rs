//! The base runner image: staged offline from local files (static busybox, git and its libraries, the static
//! agent) and built with BuildKit; labelled with a content key so an unchanged rebuild is skipped.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::buildkit::{BuildProgress, DockerEndpoint};

/// The base runner image's Dockerfile, compiled in.
pub const DOCKERFILE: &str = include_str!("../../runner-image/Dockerfile");
pub use super::rootfs::CONTENT_KEY_LABEL;

/// The default `OPSCHAIN_BASE_RUNNER`.
pub fn default_reference() -> String {
    format!("runner/opschain-runner:{}", env!("CARGO_PKG_VERSION"))
}

pub use super::rootfs::OfflineImageError as BaseImageError;
use super::rootfs::{is_static, shared_libraries, stage_file, stage_link};

const AGENT_FIX: &str = "point RUNNER_AGENT_BIN at a static agent (`RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p runner-agent --release --target x86_64-unknown-linux-gnu` builds one), or unset it to use the agent this runner carries";
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
    /// `RUNNER_BUSYBOX` or `/bin/busybox`, the agent ([`super::agent::locate`]: `RUNNER_AGENT_BIN` or the one this
    /// binary carries, written out under `home`), and the system's git and docker CLI if it has them.
    pub fn from_env(home: &Path) -> BaseImageInputs {
        let busybox = std::env::var_os("RUNNER_BUSYBOX")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/bin/busybox".into());
        let found = |path: &str| Some(PathBuf::from(path)).filter(|p| p.exists());
        let git = found("/usr/bin/git");
        let docker_cli = found("/usr/bin/docker");
        BaseImageInputs {
            busybox,
            agent: super::agent::locate(home),
            git,
            docker_cli,
        }
    }
}

pub use super::rootfs::OfflineImage as BaseImage;

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
    // The labels are inputs too: an image built before it was labelled gets rebuilt with them.
    key.update(b"runner.base.from=scratch");
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
    // Labelled like the bases built `--from` an image, so `runner image list` shows it beside them.
    let labels = std::collections::BTreeMap::from([(
        super::layered::FROM_LABEL.to_owned(),
        "scratch".to_owned(),
    )]);
    super::rootfs::build_if_changed(
        endpoint, docker, &dir, &key, reference, labels, progress, cancel,
    )
    .await
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
