//! Project repositories: a bare mirror per project (git2), revision resolution, files at a commit, and the
//! deterministic `repo.tar` a step image is built from.

mod beneath;
mod fetch;
pub mod remote;
mod repo_tar;
mod sources;

pub use beneath::{PathError, SnapshotDir};
pub use fetch::FetchProblem;
pub use remote::{RemoteAccess, RemoteError, Transport};
pub use repo_tar::{repo_tar, repo_tree};
pub use sources::{fetch_mirror, on_mirror, remote_access, GitSources};

use git2::{Oid, Repository};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::cache::files;
use crate::properties::deep_merge;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("project {project:?} has no git remote: set one with `runner project set-git-remote --project {project} --url URL|PATH`")]
    NoRemote { project: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("fetching {remote} over {transport} failed: {problem}")]
    Fetch {
        remote: String,
        transport: Transport,
        problem: Box<FetchProblem>,
    },
    #[error("revision {rev:?} does not exist in {remote}: use a branch, tag or commit SHA of that repository (`git -C {remote} log --oneline` lists commits)")]
    UnknownRev { rev: String, remote: String },
    #[error("failed to read {what} at {sha}: {source}")]
    Git {
        what: String,
        sha: String,
        #[source]
        source: git2::Error,
    },
    #[error("{path} at {sha} is malformed: {message}")]
    Malformed {
        path: String,
        sha: String,
        message: String,
    },
    #[error("{path} at {sha} is reached through the symlink {link}: repository files are read as committed and symlinks are never followed; commit the file itself at {path}")]
    Symlink {
        path: String,
        sha: String,
        link: String,
    },
    #[error("failed to write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Git's file mode of a symlink.
const SYMLINK_MODE: i32 = 0o120000;

/// An exclusive lock on a mirror or a cached file (`<path>.lock` beside it), held until dropped. A lock that cannot
/// be taken is an error: two writers must never both think they hold it.
fn lock(guarded: &Path) -> Result<files::FileLock, SnapshotError> {
    files::lock(guarded).map_err(|source| SnapshotError::Io {
        path: files::lock_path(guarded),
        source,
    })
}

/// Removes what an interrupted fetch left in the mirror (libgit2's `objects/pack/pack_git2_*` scratch packs, often
/// hundreds of MB). Only called with the mirror's lock held, when no fetch can be writing one.
fn remove_interrupted_fetches(mirror: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let pack_dir = mirror.join("objects/pack");
    let io = |source| SnapshotError::Io {
        path: pack_dir.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&pack_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(e)),
    };
    let mut removed = vec![];
    for entry in entries {
        let entry = entry.map_err(io)?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("pack_git2_")
        {
            files::remove_all(&entry.path()).map_err(io)?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// A project's bare mirror under `<home>/repos/`.
pub struct Mirror {
    repo: Repository,
    remote: String,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("remote", &self.remote)
            .field("path", &self.repo.path())
            .finish()
    }
}

/// Where a project's mirror lives.
pub fn mirror_path(home: &Path, project_code: &str) -> PathBuf {
    home.join("repos").join(format!("{project_code}.git"))
}

impl Mirror {
    /// Opens (creating) the mirror of `remote` at `path`, without fetching.
    pub fn open(path: &Path, remote: &str) -> Result<Mirror, SnapshotError> {
        let git = |source| SnapshotError::Git {
            what: format!("the mirror {}", path.display()),
            sha: String::new(),
            source,
        };
        let repo = match Repository::open_bare(path) {
            Ok(repo) => repo,
            Err(_) => {
                // Two runners may create the first change of a project at once: one creates, the other waits.
                let _lock = lock(path)?;
                match Repository::open_bare(path) {
                    Ok(repo) => repo,
                    Err(_) => Repository::init_bare(path).map_err(git)?,
                }
            }
        };
        Ok(Mirror {
            repo,
            remote: remote.to_owned(),
        })
    }

    /// Fetches every branch and tag of a remote that needs no credential, pruning what the remote deleted.
    pub fn fetch(&self) -> Result<(), SnapshotError> {
        self.fetch_with(
            &RemoteAccess::default(),
            &std::sync::atomic::AtomicBool::new(false),
        )
    }

    /// Resolves any revision git understands to a full commit SHA.
    pub fn resolve(&self, rev: &str) -> Result<String, SnapshotError> {
        let unknown = || SnapshotError::UnknownRev {
            rev: rev.to_owned(),
            remote: self.remote.clone(),
        };
        if rev.trim().is_empty() || rev.starts_with('-') {
            return Err(unknown());
        }
        let object = self.repo.revparse_single(rev).map_err(|_| unknown())?;
        let commit = object.peel_to_commit().map_err(|_| unknown())?;
        Ok(commit.id().to_string())
    }

    fn commit(&self, sha: &str) -> Result<git2::Commit<'_>, SnapshotError> {
        let git = |source| SnapshotError::Git {
            what: "the commit".into(),
            sha: sha.to_owned(),
            source,
        };
        self.repo
            .find_commit(Oid::from_str(sha).map_err(git)?)
            .map_err(git)
    }

    /// A file of the tree at `sha`, if it exists (and is a file). Read from the commit's objects, so nothing
    /// outside the repository can be reached; a symlink on the way (the file itself or a directory above it) is
    /// an error rather than its target's text or a silent "absent".
    pub fn read_file(&self, sha: &str, path: &str) -> Result<Option<Vec<u8>>, SnapshotError> {
        let commit = self.commit(sha)?;
        let git = |what: &str| {
            let (what, sha) = (what.to_owned(), sha.to_owned());
            move |source| SnapshotError::Git { what, sha, source }
        };
        let mut tree = commit.tree().map_err(git("the tree"))?;
        let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
        for (i, name) in names.iter().enumerate() {
            let Some(entry) = tree.get_name(name).map(|e| e.to_owned()) else {
                return Ok(None);
            };
            if entry.filemode() == SYMLINK_MODE {
                return Err(SnapshotError::Symlink {
                    path: path.to_owned(),
                    sha: sha.to_owned(),
                    link: names[..=i].join("/"),
                });
            }
            let object = entry.to_object(&self.repo).map_err(git(path))?;
            if i + 1 == names.len() {
                return Ok(object.into_blob().ok().map(|b| b.content().to_vec()));
            }
            match object.into_tree() {
                Ok(next) => tree = next,
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    }

    /// `.opschain/properties.*` deep-merged with `.opschain/environments/<env>.*` at `sha` (JSON, TOML or YAML).
    pub fn repository_properties(
        &self,
        sha: &str,
        environment: &str,
    ) -> Result<Value, SnapshotError> {
        let mut merged = Value::Object(Default::default());
        for stem in [
            ".opschain/properties".to_owned(),
            format!(".opschain/environments/{environment}"),
        ] {
            if let Some(layer) = self.properties_file(sha, &stem)? {
                deep_merge(&mut merged, &layer);
            }
        }
        Ok(merged)
    }

    fn properties_file(&self, sha: &str, stem: &str) -> Result<Option<Value>, SnapshotError> {
        for extension in ["json", "toml", "yaml", "yml"] {
            let path = format!("{stem}.{extension}");
            let Some(bytes) = self.read_file(sha, &path)? else {
                continue;
            };
            let malformed = |message: String| SnapshotError::Malformed {
                path: path.clone(),
                sha: sha.to_owned(),
                message,
            };
            let text = String::from_utf8(bytes).map_err(|e| malformed(e.to_string()))?;
            let value: Value = match extension {
                "json" => serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?,
                "toml" => toml::from_str(&text).map_err(|e| malformed(e.to_string()))?,
                _ => serde_yaml_ng::from_str(&text).map_err(|e| malformed(e.to_string()))?,
            };
            if !value.is_object() {
                return Err(malformed("properties must be an object".into()));
            }
            return Ok(Some(value));
        }
        Ok(None)
    }

    /// How many branches and tags the mirror holds.
    pub fn ref_count(&self) -> u32 {
        self.repo
            .references()
            .map(|refs| {
                refs.flatten()
                    .filter(|r| r.is_branch() || r.is_tag())
                    .count() as u32
            })
            .unwrap_or(0)
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }
}
