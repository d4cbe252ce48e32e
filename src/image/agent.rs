//! The static in-container agent this binary carries (built and embedded by build.rs), written out for the base
//! image's build when it is needed; `RUNNER_AGENT_BIN` names another one instead.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The agent's bytes, embedded at build time.
pub const EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/opschain-agent"));

/// The variable that overrides the embedded agent with a file.
pub const OVERRIDE: &str = "RUNNER_AGENT_BIN";

/// `RUNNER_AGENT_BIN` if set; otherwise the embedded agent, written once (named by its content) under
/// `home/agent/`. A write that fails is reported when the file is read, naming its path and the fix.
pub fn locate(home: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os(OVERRIDE) {
        return path.into();
    }
    let digest = hex::encode(&Sha256::digest(EMBEDDED)[..8]);
    let path = home.join("agent").join(format!("opschain-agent-{digest}"));
    if let Err(e) = write_out(&path) {
        tracing::warn!(path = %path.display(), error = %e, "could not write out the embedded agent");
    }
    path
}

/// Writes the embedded agent to `path` unless it is there already: a unique temporary, then an atomic rename,
/// so concurrent runners never see half a file.
fn write_out(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|bytes| bytes == EMBEDDED) {
        return Ok(());
    }
    let dir = path.parent().expect("the agent's path has a folder");
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!(".opschain-agent-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::write(&temporary, EMBEDDED)
        .and_then(|()| std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_agent_is_a_static_executable_written_once() {
        assert_eq!(&super::EMBEDDED[..4], b"\x7fELF");
        let home = tempfile::tempdir().unwrap();
        if std::env::var_os(super::OVERRIDE).is_some() {
            return;
        }
        let path = super::locate(home.path());
        assert_eq!(std::fs::read(&path).unwrap(), super::EMBEDDED);
        assert!(crate::image::rootfs::is_static(&path));
        assert_eq!(super::locate(home.path()), path, "named by its content");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
