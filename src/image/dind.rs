//! The Docker-in-Docker image a `docker: dind` step's daemon runs from. No registry exists, so like the base runner
//! image it is staged from this machine's files — Debian's docker.io, which the machine running the runner has —
//! and built with BuildKit once; its content key skips every later build.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::rootfs::{
    build_if_changed, is_static, shared_libraries, stage_file, stage_link, OfflineImage,
    OfflineImageError,
};
use crate::buildkit::{BuildProgress, DockerEndpoint};

pub const DOCKERFILE: &str = include_str!("../../runner-image/dind/Dockerfile");
pub const ENTRYPOINT: &str = include_str!("../../runner-image/dind/entrypoint.sh");

/// The image `docker: dind` steps use: `RUNNER_DIND_IMAGE`, or the locally built one.
pub fn reference() -> String {
    std::env::var("RUNNER_DIND_IMAGE")
        .unwrap_or_else(|_| format!("runner/opschain-dind:{}", env!("CARGO_PKG_VERSION")))
}

const DOCKER_FIX: &str =
    "install Debian's docker.io (`apt-get install docker.io`), whose daemon the image is made of";
const BUSYBOX_FIX: &str = "install Debian's busybox-static (`apt-get install busybox-static`) or point RUNNER_BUSYBOX at a static busybox";

/// The daemon's programs, where Debian's docker.io, containerd and runc packages put them, and where they go.
const PROGRAMS: [(&str, &[&str]); 8] = [
    (
        "/usr/sbin/dockerd",
        &["/usr/sbin/dockerd", "/usr/bin/dockerd"],
    ),
    (
        "/usr/bin/containerd",
        &["/usr/bin/containerd", "/usr/sbin/containerd"],
    ),
    (
        "/usr/bin/containerd-shim-runc-v2",
        &["/usr/bin/containerd-shim-runc-v2"],
    ),
    ("/usr/sbin/runc", &["/usr/sbin/runc", "/usr/bin/runc"]),
    (
        "/usr/bin/docker-init",
        &["/usr/bin/docker-init", "/usr/sbin/docker-init"],
    ),
    (
        "/usr/sbin/docker-proxy",
        &["/usr/sbin/docker-proxy", "/usr/bin/docker-proxy"],
    ),
    ("/usr/bin/docker", &["/usr/bin/docker"]),
    // iptables is an alternatives symlink to xtables-nft-multi or -legacy-multi: the real file, named for itself.
    ("/usr/sbin/iptables", &["/usr/sbin/iptables"]),
];

/// The iptables modules (`libxt_*.so`), which iptables loads by name and ldd does not list.
const XTABLES_DIRS: [&str; 2] = ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/xtables"];

fn find(host: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|c| host.join(c.trim_start_matches('/')))
        .find(|p| p.exists())
}

/// Stages the root filesystem under `dir/rootfs` from the programs installed under `host` (`/` but in tests) and
/// returns the content key of everything in it.
pub fn stage(busybox: &Path, host: &Path, dir: &Path) -> Result<String, OfflineImageError> {
    if !busybox.exists() {
        return Err(OfflineImageError::MissingInput {
            what: "busybox",
            path: busybox.to_owned(),
            fix: BUSYBOX_FIX,
        });
    }
    if !is_static(busybox) {
        return Err(OfflineImageError::NotStatic {
            path: busybox.to_owned(),
            fix: BUSYBOX_FIX,
        });
    }
    let rootfs = dir.join("rootfs");
    let stage_err = |path: &Path| {
        let path = path.to_owned();
        move |source| OfflineImageError::Stage { path, source }
    };
    let mut key = Sha256::new();
    key.update(DOCKERFILE.as_bytes());
    key.update(ENTRYPOINT.as_bytes());
    let mut file = |from: &Path, to: &str, mode: u32| -> Result<(), OfflineImageError> {
        let dest = rootfs.join(to.trim_start_matches('/'));
        stage_file(from, &dest, mode).map_err(stage_err(&dest))?;
        key.update(to.as_bytes());
        key.update(std::fs::read(&dest).map_err(stage_err(&dest))?);
        Ok(())
    };
    file(busybox, "/bin/busybox", 0o755)?;
    let mut links: Vec<(String, PathBuf)> = vec![];
    let mut libraries = vec![];
    for (target, candidates) in PROGRAMS {
        let Some(found) = find(host, candidates) else {
            return Err(OfflineImageError::MissingInput {
                what: "a Docker daemon program",
                path: candidates[0].into(),
                fix: DOCKER_FIX,
            });
        };
        let real = std::fs::canonicalize(&found).map_err(stage_err(&found))?;
        if target == "/usr/sbin/iptables" {
            let name = real
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            let real_target = format!("/usr/sbin/{name}");
            file(&real, &real_target, 0o755)?;
            for tool in [
                "iptables",
                "iptables-save",
                "iptables-restore",
                "ip6tables",
                "ip6tables-save",
                "ip6tables-restore",
            ] {
                links.push((name.clone(), rootfs.join("usr/sbin").join(tool)));
            }
        } else {
            file(&real, target, 0o755)?;
        }
        libraries.extend(shared_libraries(&real));
    }
    if let Some((xtables, target_dir)) = XTABLES_DIRS
        .iter()
        .map(|d| (host.join(d.trim_start_matches('/')), d))
        .find(|(d, _)| d.is_dir())
    {
        let xtables = xtables.as_path();
        let mut modules: Vec<PathBuf> = std::fs::read_dir(xtables)
            .map_err(stage_err(xtables))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "so"))
            .collect();
        modules.sort();
        for module in modules {
            // Some modules are symlinks to others: copy what they point at, under their own name.
            let real = std::fs::canonicalize(&module).map_err(stage_err(&module))?;
            let name = module.file_name().expect("a file").to_string_lossy();
            file(&real, &format!("{target_dir}/{name}"), 0o644)?;
            libraries.extend(shared_libraries(&real));
        }
    }
    libraries.sort();
    libraries.dedup();
    for library in libraries {
        file(&library, &library.to_string_lossy(), 0o755)?;
    }

    let entrypoint = dir.join("dind-entrypoint");
    if std::fs::read_to_string(&entrypoint).ok().as_deref() != Some(ENTRYPOINT) {
        std::fs::write(&entrypoint, ENTRYPOINT).map_err(stage_err(&entrypoint))?;
    }
    let passwd = dir.join("passwd");
    let passwd_content = "root:x:0:0:root:/root:/bin/sh\n";
    if std::fs::read_to_string(&passwd).ok().as_deref() != Some(passwd_content) {
        std::fs::write(&passwd, passwd_content).map_err(stage_err(&passwd))?;
    }
    {
        let file = |from: &Path, to: &str, mode: u32| {
            let dest = rootfs.join(to.trim_start_matches('/'));
            stage_file(from, &dest, mode).map_err(stage_err(&dest))
        };
        file(&entrypoint, "/usr/local/bin/dind-entrypoint", 0o755)?;
        file(&passwd, "/etc/passwd", 0o644)?;
    }

    let applets = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(stage_err(busybox))?;
    links.extend(
        String::from_utf8_lossy(&applets.stdout)
            .lines()
            .filter(|a| !a.is_empty() && *a != "busybox")
            .map(|a| ("/bin/busybox".to_owned(), rootfs.join("bin").join(a))),
    );
    // dockerd writes its pid and containerd's socket under /var/run.
    links.push(("/run".to_owned(), rootfs.join("var/run")));
    for (target, link) in &links {
        stage_link(target, link).map_err(stage_err(link))?;
        key.update(link.to_string_lossy().as_bytes());
        key.update(target.as_bytes());
    }
    for d in ["tmp", "run", "root", "var/lib", "sys/fs/cgroup"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(stage_err(&rootfs.join(d)))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let tmp = rootfs.join("tmp");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
            .map_err(stage_err(&tmp))?;
    }
    let dockerfile = dir.join("Dockerfile");
    if std::fs::read_to_string(&dockerfile).ok().as_deref() != Some(DOCKERFILE) {
        std::fs::write(&dockerfile, DOCKERFILE).map_err(stage_err(&dockerfile))?;
    }
    Ok(hex::encode(key.finalize()))
}

/// Builds the dind image into `reference` unless an image of that name with the same content key exists.
pub async fn build_dind(
    home: &Path,
    endpoint: &DockerEndpoint,
    docker: &bollard::Docker,
    busybox: &Path,
    reference: &str,
    progress: UnboundedSender<BuildProgress>,
    cancel: CancellationToken,
) -> Result<OfflineImage, OfflineImageError> {
    let dir = home.join("dind-image");
    let (busybox_path, dir_path) = (busybox.to_owned(), dir.clone());
    // Staging reads ~200 MB: off the async threads.
    let key = tokio::task::spawn_blocking(move || stage(&busybox_path, Path::new("/"), &dir_path))
        .await
        .expect("staging does not panic")?;
    build_if_changed(
        endpoint,
        docker,
        &dir,
        &key,
        reference,
        Default::default(),
        progress,
        cancel,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_busybox_says_what_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let err = stage(&dir.path().join("nope"), Path::new("/"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("busybox not found") && err.contains("busybox-static"),
            "{err}"
        );
        let err = stage(Path::new("/usr/bin/git"), Path::new("/"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a static binary"), "{err}");
    }

    #[test]
    fn a_machine_without_docker_io_is_told_to_install_it() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            // tools/setup.sh installs it; without it the check above already fails first.
            assert!(std::env::var_os("CI").is_none(), "CI has busybox-static");
            return;
        }
        let (host, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let err = stage(busybox, host.path(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a Docker daemon program not found at /usr/sbin/dockerd")
                && err.contains("apt-get install docker.io"),
            "{err}"
        );
    }

    #[test]
    fn the_entrypoint_starts_dockerd_on_the_shared_socket() {
        // The executor mounts the socket volume at /run/dind and probes /run/dind/docker.sock.
        let socket = format!(
            "exec dockerd --host=unix://{}/docker.sock ",
            crate::executor::docker::spec::DIND_SOCKET_DIR
        );
        assert!(ENTRYPOINT.contains(&socket));
        assert!(DOCKERFILE.contains("ENTRYPOINT [\"/usr/local/bin/dind-entrypoint\"]"));
    }
}
