//! `repo.tar`: the whole repository at one commit, `.git` included, as deterministic bytes. Every entry has the
//! commit's time as mtime, uid/gid 0, no owner names and a normalised mode; entries are sorted; `.git` holds a
//! detached HEAD, one pack of the commit's history (built single-threaded, so the same every time) and an index
//! without stat data. Two builds of one SHA are byte-identical, and the cached file is never rewritten, so
//! BuildKit's file sync sees an unchanged size and mtime and its cache hits.

use git2::{ObjectType, Oid, TreeWalkMode, TreeWalkResult};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{Mirror, SnapshotError};
use crate::cache::files;

enum Entry {
    Dir,
    Blob { oid: Oid, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink { target: Vec<u8> },
}

const GIT_CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = false\n";

/// Returns `<cache_dir>/<sha>.tar`, building it first if it does not exist yet.
pub fn repo_tar(mirror: &Mirror, sha: &str, cache_dir: &Path) -> Result<PathBuf, SnapshotError> {
    let path = cache_dir.join(format!("{sha}.tar"));
    if path.exists() {
        return Ok(path);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { path, source }
    };
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    // Parallel steps of one change ask for the same SHA at once: one builds, the others wait and reuse it.
    let _building = super::lock(&path)?;
    if path.exists() {
        return Ok(path);
    }
    remove_interrupted(cache_dir, &format!("{sha}.tar"))?;
    let repo = mirror.repository();
    let git = |what: &str| {
        let (what, sha) = (what.to_owned(), sha.to_owned());
        move |source| SnapshotError::Git { what, sha, source }
    };
    let commit = mirror.commit(sha)?;
    let mtime = commit.time().seconds().max(0) as u64;
    let tree = commit.tree().map_err(git("the tree"))?;

    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut walk_error = None;
    tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        let name = format!("{dir}{}", entry.name().unwrap_or_default());
        let mode = entry.filemode() as u32;
        match entry.kind() {
            Some(ObjectType::Tree) => {
                entries.insert(name, Entry::Dir);
            }
            Some(ObjectType::Blob) if mode == 0o120000 => match repo.find_blob(entry.id()) {
                Ok(blob) => {
                    entries.insert(
                        name,
                        Entry::Symlink {
                            target: blob.content().to_vec(),
                        },
                    );
                }
                Err(e) => {
                    walk_error = Some(e);
                    return TreeWalkResult::Abort;
                }
            },
            Some(ObjectType::Blob) => {
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                entries.insert(
                    name,
                    Entry::Blob {
                        oid: entry.id(),
                        mode,
                    },
                );
            }
            // A submodule: an empty directory, as a checkout without `submodule update` has.
            Some(ObjectType::Commit) => {
                entries.insert(name, Entry::Dir);
            }
            _ => {}
        }
        TreeWalkResult::Ok
    })
    .map_err(git("the tree"))?;
    if let Some(e) = walk_error {
        return Err(git("a symlink")(e));
    }

    // `.git`: detached HEAD, the history as one pack, and an index so `git status` inside the step is clean.
    let name = format!("{sha}.tar");
    let scratch = tempdir_in(cache_dir, &name)?;
    let mut packer = repo.packbuilder().map_err(git("the history"))?;
    packer.set_threads(1);
    let mut walk = repo.revwalk().map_err(git("the history"))?;
    walk.push(commit.id()).map_err(git("the history"))?;
    packer.insert_walk(&mut walk).map_err(git("the history"))?;
    let pack_dir = scratch.join("pack");
    std::fs::create_dir_all(&pack_dir).map_err(io(&pack_dir))?;
    packer.write(&pack_dir, 0o644).map_err(git("the pack"))?;
    let index_path = scratch.join("index");
    let mut index = git2::Index::open(&index_path).map_err(git("the index"))?;
    index.read_tree(&tree).map_err(git("the index"))?;
    index.write().map_err(git("the index"))?;

    for dir in [
        ".git",
        ".git/objects",
        ".git/objects/info",
        ".git/objects/pack",
        ".git/refs",
        ".git/refs/heads",
        ".git/refs/tags",
    ] {
        entries.insert(dir.to_owned(), Entry::Dir);
    }
    let file = |data: Vec<u8>| Entry::Bytes { data, mode: 0o644 };
    entries.insert(".git/HEAD".into(), file(format!("{sha}\n").into_bytes()));
    entries.insert(".git/config".into(), file(GIT_CONFIG.as_bytes().to_vec()));
    entries.insert(
        ".git/index".into(),
        file(std::fs::read(&index_path).map_err(io(&index_path))?),
    );
    let mut packs: Vec<_> = std::fs::read_dir(&pack_dir)
        .map_err(io(&pack_dir))?
        .filter_map(|e| e.ok())
        .collect();
    packs.sort_by_key(|e| e.file_name());
    for pack in packs {
        let name = pack.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(pack.path()).map_err(io(&pack.path()))?;
        entries.insert(
            format!(".git/objects/pack/{name}"),
            Entry::Bytes { data, mode: 0o444 },
        );
    }

    let tmp = files::temporary(cache_dir, &name);
    let written = write_tar(repo, &entries, mtime, &tmp);
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io { path: tmp, source });
    }
    // The rename is atomic, so a reader never sees half a tar, even one that skipped the lock.
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// `<cache_dir>/<sha>/`: the repository at `sha` unpacked from its repo.tar (in `tars`), for builds whose context is
/// the repository itself (service images). Unpacked once; every entry keeps the tar's fixed mtime, so BuildKit's
/// file sync sees nothing new on later builds.
pub fn repo_tree(
    mirror: &Mirror,
    sha: &str,
    tars: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, SnapshotError> {
    let path = cache_dir.join(sha);
    if path.is_dir() {
        return Ok(path);
    }
    let tar = repo_tar(mirror, sha, tars)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { path, source }
    };
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let _unpacking = super::lock(&path)?;
    if path.is_dir() {
        return Ok(path);
    }
    remove_interrupted(cache_dir, sha)?;
    let scratch = tempdir_in(cache_dir, sha)?;
    let file = std::fs::File::open(&tar).map_err(io(&tar))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    archive.set_preserve_mtime(true);
    archive.set_preserve_permissions(true);
    let unpacked = archive.unpack(&scratch).map_err(io(&scratch));
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    std::fs::rename(&scratch, &path).map_err(io(&path))?;
    Ok(path)
}

/// A scratch directory for building `dir/<name>` (removed as an interrupted one once `name`'s lock is free).
fn tempdir_in(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    let path = files::temporary(dir, name);
    std::fs::create_dir_all(&path).map_err(|source| SnapshotError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Removes what interrupted builders left in `dir` (their lock is free, or is the caller's: `held`); logs it.
fn remove_interrupted(dir: &Path, held: &str) -> Result<(), SnapshotError> {
    let removed =
        files::remove_interrupted(dir, Some(held)).map_err(|source| SnapshotError::Io {
            path: dir.to_owned(),
            source,
        })?;
    if !removed.is_empty() {
        tracing::info!(dir = %dir.display(), ?removed, "removed what interrupted builds left");
    }
    Ok(())
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn write_tar(
    repo: &git2::Repository,
    entries: &BTreeMap<String, Entry>,
    mtime: u64,
    to: &Path,
) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(to)?,
    ));
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, entry) in entries {
        match entry {
            Entry::Dir => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
                tar.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::Blob { oid, mode } => {
                let blob = repo.find_blob(*oid).map_err(std::io::Error::other)?;
                let mut h = header(
                    tar::EntryType::Regular,
                    *mode,
                    blob.content().len() as u64,
                    mtime,
                );
                tar.append_data(&mut h, path, blob.content())?;
            }
            Entry::Bytes { data, mode } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64, mtime);
                tar.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
                let target = String::from_utf8_lossy(target).into_owned();
                tar.append_link(&mut h, path, target)?;
            }
        }
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.get_ref().sync_all()
}
