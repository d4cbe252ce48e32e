//! `runner cache prune`: removes cached repo.tars, repository trees, build contexts and the runner's own images
//! that no unfinished change uses, oldest first, keeping what the options ask to keep. Files are removed under
//! the lock of what they are (one being built is skipped); an image a container still uses is skipped by the
//! daemon itself.

use bollard::query_parameters::{ListImagesOptions, RemoveImageOptions};
use bollard::Docker;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::files;

/// Every kind of image the runner builds and may prune (repositories of their tags). One list: a new kind of image
/// is added here and nowhere else.
pub const IMAGE_KINDS: &[&str] = &[
    crate::image::step::STEP_IMAGE_REPOSITORY,
    crate::image::step::SERVICE_IMAGE_REPOSITORY,
];

/// What to keep.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Only what was last written (files) or created (images) longer ago than this.
    pub older_than: Option<Duration>,
    /// The newest images of each kind that stay, whatever their age.
    pub keep_images: usize,
    /// Report what would be removed; remove nothing.
    pub dry_run: bool,
}

/// What unfinished changes use (their commits and their step images), and the base runner images that projects,
/// environments or the operator's default name.
#[derive(Debug, Clone, Default)]
pub struct InUse {
    pub shas: BTreeSet<String>,
    pub images: BTreeSet<String>,
    pub base_images: BTreeSet<String>,
}

/// One thing removed (or, on a dry run, to be removed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// `repo-tar`, `repo-tree`, `context` or an image kind.
    pub kind: String,
    /// A path, or an image tag.
    pub what: String,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("failed to prune {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to list the base runner images: {0}")]
    Base(String),
    #[error("failed to {action} images of the Docker daemon: {source}")]
    Docker {
        action: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
}

/// Reads what the unfinished changes of `store` use.
pub async fn in_use(store: &crate::store::Store) -> Result<InUse, crate::store::StoreError> {
    let mut used = InUse {
        base_images: store.base_images_in_use().await?.into_iter().collect(),
        ..InUse::default()
    };
    for change in store.unfinished_changes().await? {
        used.shas.insert(change.git_sha.clone());
        for step in store.steps(&change.id).await? {
            if let Some(image) = step.image_id {
                used.images.insert(image);
            }
        }
    }
    Ok(used)
}

/// One cached file or tree, as [`entries`] finds it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `repo-tar`, `repo-tree` or `context`.
    pub kind: &'static str,
    pub path: PathBuf,
    pub modified: Option<SystemTime>,
    pub bytes: u64,
    /// An unfinished change uses it: never pruned.
    pub in_use: bool,
}

/// Every cached file and tree under `home` (see [`super`] for the layout), temporaries and locks left out.
pub fn entries(home: &Path, used: &InUse) -> Result<Vec<Entry>, PruneError> {
    let mut found = vec![];
    let used_keys: BTreeSet<&str> = used
        .images
        .iter()
        .filter_map(|image| image.rsplit_once(':').map(|(_, key)| key))
        .collect();
    for (kind, dir, name_of) in [
        (
            "repo-tar",
            super::repo_tars(home),
            (|name: &str| name.strip_suffix(".tar").map(str::to_owned))
                as fn(&str) -> Option<String>,
        ),
        ("repo-tree", super::repo_trees(home), |name: &str| {
            Some(name.to_owned())
        }),
        ("context", super::contexts(home), |name: &str| {
            Some(name.to_owned())
        }),
    ] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with('.') || file_name.ends_with(".lock") {
                continue; // temporaries are their writers' (or the next build's) to remove; locks stay
            }
            let Some(id) = name_of(&file_name) else {
                continue;
            };
            let in_use = match kind {
                "context" => used_keys.contains(id.as_str()),
                _ => used.shas.contains(&id),
            };
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            found.push(Entry {
                kind,
                modified: meta.modified().ok(),
                bytes: size_of(&path),
                path,
                in_use,
            });
        }
    }
    Ok(found)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PruneError {
    let path = path.to_owned();
    move |source| PruneError::Io { path, source }
}

/// Removes `entry` under its lock (unless `dry_run`); `None` when it is being built right now and stays.
pub fn remove(entry: &Entry, dry_run: bool) -> Result<Option<Pruned>, PruneError> {
    let Some(_lock) = files::try_lock(&entry.path).map_err(io(&entry.path))? else {
        return Ok(None);
    };
    if !dry_run {
        files::remove_all(&entry.path).map_err(io(&entry.path))?;
    }
    Ok(Some(Pruned {
        kind: entry.kind.to_owned(),
        what: entry.path.display().to_string(),
        bytes: entry.bytes,
    }))
}

/// Prunes the cache files under `home` that no unfinished change uses and that are old enough.
pub fn prune_files(
    home: &Path,
    used: &InUse,
    options: &PruneOptions,
) -> Result<Vec<Pruned>, PruneError> {
    let mut pruned = vec![];
    for entry in entries(home, used)? {
        if entry.in_use || !old_enough(entry.modified, options.older_than) {
            continue;
        }
        pruned.extend(remove(&entry, options.dry_run)?);
    }
    Ok(pruned)
}

fn old_enough(modified: Option<SystemTime>, older_than: Option<Duration>) -> bool {
    match (older_than, modified) {
        (None, _) => true,
        (Some(age), Some(at)) => at.elapsed().map(|e| e >= age).unwrap_or(false),
        (Some(_), None) => false,
    }
}

/// Bytes under `path` (a file or a tree; what cannot be read counts nothing).
fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| size_of(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Prunes the runner's images ([`IMAGE_KINDS`]) on `docker`.
pub async fn prune_images(
    docker: &Docker,
    used: &InUse,
    options: &PruneOptions,
) -> Result<Vec<Pruned>, PruneError> {
    let mut pruned = vec![];
    let now = chrono::Utc::now().timestamp();
    for kind in IMAGE_KINDS {
        let images = docker
            .list_images(Some(ListImagesOptions {
                filters: Some(HashMap::from([(
                    "reference".to_owned(),
                    vec![format!("{kind}:*")],
                )])),
                ..Default::default()
            }))
            .await
            .map_err(|source| PruneError::Docker {
                action: "list",
                source,
            })?;
        let mut tagged: Vec<(i64, String, u64)> = images
            .iter()
            .flat_map(|image| {
                image
                    .repo_tags
                    .iter()
                    .filter(|tag| tag.starts_with(&format!("{kind}:")))
                    .map(|tag| (image.created, tag.clone(), image.size.max(0) as u64))
            })
            .collect();
        tagged.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (created, tag, bytes) in tagged.into_iter().skip(options.keep_images) {
            let age = Duration::from_secs(now.saturating_sub(created).max(0) as u64);
            if used.images.contains(&tag) || options.older_than.is_some_and(|min| age < min) {
                continue;
            }
            if !options.dry_run {
                let removed = docker
                    .remove_image(
                        &tag,
                        Some(RemoveImageOptions {
                            force: false,
                            noprune: false,
                            ..Default::default()
                        }),
                        None,
                    )
                    .await;
                match removed {
                    Ok(_) => {}
                    // A container still uses it (409), or it went meanwhile (404): not ours to remove now.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404 | 409,
                        ..
                    }) => continue,
                    Err(source) => {
                        return Err(PruneError::Docker {
                            action: "remove",
                            source,
                        })
                    }
                }
            }
            pruned.push(Pruned {
                kind: kind.to_string(),
                what: tag,
                bytes,
            });
        }
    }
    Ok(pruned)
}

/// Prunes base runner images built `--from` another image that no project, environment or the operator's default
/// names (the offline default, built from scratch, always stays). Removing a name only untags what step images
/// still build on.
pub async fn prune_base_images(
    docker: &Docker,
    used: &InUse,
    options: &PruneOptions,
) -> Result<Vec<Pruned>, PruneError> {
    let listed = crate::image::layered::list(docker)
        .await
        .map_err(|e| PruneError::Base(e.to_string()))?;
    let now = chrono::Utc::now().timestamp();
    let mut pruned = vec![];
    let candidates = listed.into_iter().filter(|b| b.from != "scratch");
    for base in candidates.skip(options.keep_images) {
        let age = Duration::from_secs(now.saturating_sub(base.created).max(0) as u64);
        if base.names.iter().any(|n| used.base_images.contains(n))
            || options.older_than.is_some_and(|min| age < min)
        {
            continue;
        }
        for name in &base.names {
            if !options.dry_run {
                match docker
                    .remove_image(name, None::<RemoveImageOptions>, None)
                    .await
                {
                    Ok(_) => {}
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404 | 409,
                        ..
                    }) => continue,
                    Err(source) => {
                        return Err(PruneError::Docker {
                            action: "remove",
                            source,
                        })
                    }
                }
            }
            pruned.push(Pruned {
                kind: "base-image".to_owned(),
                what: name.clone(),
                bytes: base.size_bytes.max(0) as u64,
            });
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_limits_keep_what_is_younger_or_of_unknown_age() {
        let hour = Duration::from_secs(3600);
        let two_hours_ago = SystemTime::now() - 2 * hour;
        assert!(old_enough(Some(two_hours_ago), Some(hour)));
        assert!(!old_enough(Some(SystemTime::now()), Some(hour)));
        assert!(!old_enough(None, Some(hour)));
        assert!(old_enough(Some(SystemTime::now()), None));
    }
}
