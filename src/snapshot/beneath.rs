//! Paths that come from a repository (a service's `build` Dockerfile and context), opened on the host inside an
//! unpacked snapshot. Resolution is cap-std's (`openat2` with `RESOLVE_BENEATH` where the kernel has it): a path
//! that leaves the snapshot — by `..`, an absolute path, or a committed symlink such as `svc -> ../../secrets` —
//! is refused, never followed. Symlinks that stay inside are fine.

use cap_std::fs::Dir;
use std::path::{Path, PathBuf};

/// Why a repository path cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{what} {path:?} leads outside the repository (through a symlink, `..` or an absolute path): builds may only read the repository's own files; point it at a path inside the repository")]
    Outside { what: &'static str, path: String },
    #[error("{what} {path:?} does not exist in the repository at this commit")]
    Missing { what: &'static str, path: String },
    #[error("{what} {path:?} is not a {expected} in the repository")]
    WrongKind {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("failed to open {what} {path:?} in the repository snapshot {root}: {source}")]
    Io {
        what: &'static str,
        path: String,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The root of an unpacked snapshot, through which repository paths are opened.
pub struct SnapshotDir {
    root: Dir,
    path: PathBuf,
}

impl SnapshotDir {
    /// Opens the snapshot directory `root` (a directory the runner made, so it is opened as is).
    pub fn open(root: &Path) -> Result<SnapshotDir, PathError> {
        let root_dir =
            Dir::open_ambient_dir(root, cap_std::ambient_authority()).map_err(|source| {
                PathError::Io {
                    what: "the snapshot",
                    path: ".".into(),
                    root: root.to_owned(),
                    source,
                }
            })?;
        Ok(SnapshotDir {
            root: root_dir,
            path: root.to_owned(),
        })
    }

    fn error(&self, what: &'static str, path: &str, source: std::io::Error) -> PathError {
        let path = path.to_owned();
        match source.kind() {
            // cap-std's answer to an escape attempt ("a path led outside of the filesystem").
            std::io::ErrorKind::PermissionDenied => PathError::Outside { what, path },
            std::io::ErrorKind::NotFound => PathError::Missing { what, path },
            std::io::ErrorKind::NotADirectory => PathError::WrongKind {
                what,
                path,
                expected: "directory",
            },
            std::io::ErrorKind::IsADirectory => PathError::WrongKind {
                what,
                path,
                expected: "file",
            },
            _ => PathError::Io {
                what,
                path,
                root: self.path.clone(),
                source,
            },
        }
    }

    /// The directory at `path` (`.` for the root).
    pub fn dir(&self, what: &'static str, path: &str) -> Result<Dir, PathError> {
        let path = normalise(path);
        self.root
            .open_dir(&path)
            .map_err(|e| self.error(what, &path, e))
    }

    /// The bytes of the regular file at `path`.
    pub fn read(&self, what: &'static str, path: &str) -> Result<Vec<u8>, PathError> {
        let path = normalise(path);
        let meta = self
            .root
            .metadata(&path)
            .map_err(|e| self.error(what, &path, e))?;
        if !meta.is_file() {
            return Err(PathError::WrongKind {
                what,
                path,
                expected: "file",
            });
        }
        self.root
            .read(&path)
            .map_err(|e| self.error(what, &path, e))
    }
}

/// `""` and `"./x/"` as cap-std wants them: `.` and `x`.
fn normalise(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.strip_prefix("./").unwrap_or(trimmed) {
        "" => ".".to_owned(),
        rest => rest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A snapshot beside a "secrets" directory it must never reach.
    fn world() -> (tempfile::TempDir, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let secrets = top.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("key"), b"host secret").unwrap();
        let repo = top.path().join("repo");
        std::fs::create_dir_all(repo.join("services/web")).unwrap();
        std::fs::write(repo.join("services/web/Dockerfile"), b"FROM x").unwrap();
        symlink("../secrets", repo.join("svc")).unwrap();
        symlink(&secrets, repo.join("abs")).unwrap();
        symlink("../secrets/key", repo.join("Dockerfile.out")).unwrap();
        symlink("services/web", repo.join("web")).unwrap();
        (top, repo)
    }

    #[test]
    fn symlinks_and_dots_out_of_the_snapshot_are_refused() {
        let (_top, repo) = world();
        let snapshot = SnapshotDir::open(&repo).unwrap();
        for path in ["svc", "abs", "..", "services/../..", "/etc", "svc/"] {
            let err = snapshot.dir("build context", path).unwrap_err();
            assert!(matches!(err, PathError::Outside { .. }), "{path}: {err:?}");
            assert!(err.to_string().contains("leads outside the repository"));
        }
        for path in ["Dockerfile.out", "svc/key", "../secrets/key"] {
            let err = snapshot.read("build Dockerfile", path).unwrap_err();
            assert!(matches!(err, PathError::Outside { .. }), "{path}: {err:?}");
        }
    }

    #[test]
    fn paths_inside_resolve_even_through_inner_symlinks() {
        let (_top, repo) = world();
        let snapshot = SnapshotDir::open(&repo).unwrap();
        assert_eq!(
            snapshot.read("build Dockerfile", "web/Dockerfile").unwrap(),
            b"FROM x"
        );
        assert!(snapshot.dir("build context", "./services/web/").is_ok());
        assert!(snapshot.dir("build context", ".").is_ok());
        assert!(snapshot.dir("build context", "").is_ok());
        assert!(matches!(
            snapshot.dir("build context", "nope").unwrap_err(),
            PathError::Missing { .. }
        ));
        assert!(matches!(
            snapshot.read("build Dockerfile", "services").unwrap_err(),
            PathError::WrongKind { .. }
        ));
        assert!(matches!(
            snapshot
                .dir("build context", "services/web/Dockerfile")
                .unwrap_err(),
            PathError::WrongKind { .. }
        ));
    }
}
