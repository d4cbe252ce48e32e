//! `$RUNNER_HOME/cache`: the files steps are built from, kept between changes so unchanged inputs cost nothing —
//! `repo-tars/<sha>.tar` (the repository at a commit), `repo-trees/<sha>/` (the same, unpacked, for service builds)
//! and `contexts/<key>/` (one step image's build context). [`files`] is the discipline every writer follows;
//! [`prune`] removes what no unfinished change uses; [`budget`] does so by itself when the cache outgrows its size budget.

pub mod budget;
pub mod files;
pub mod prune;

use std::path::{Path, PathBuf};

/// `repo.tar` per commit.
pub fn repo_tars(home: &Path) -> PathBuf {
    home.join("cache/repo-tars")
}

/// The repository unpacked per commit.
pub fn repo_trees(home: &Path) -> PathBuf {
    home.join("cache/repo-trees")
}

/// Build directories of base runner images layered onto a user's image, per source image ID.
pub fn base_images(home: &Path) -> PathBuf {
    home.join("cache/base-images")
}

/// Build contexts per step image content key.
pub fn contexts(home: &Path) -> PathBuf {
    home.join("cache/contexts")
}
