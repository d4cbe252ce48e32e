//! The discipline every writer of the data directory's caches follows: a file (or directory) is built under a
//! unique temporary name beside it and renamed into place, so a reader never sees half of one and two writers never
//! share a scratch file; writers of one thing serialise on its lock file, and a lock that cannot be taken is an
//! error, never ignored. A temporary is named after what it builds (`.<name>.<unique>.tmp`), so one left by an
//! interrupted writer is recognised, and removed, once the lock of what it was building is free.

use std::fs::File;
use std::path::{Path, PathBuf};

const TEMPORARY_SUFFIX: &str = ".tmp";

/// An exclusive lock on `<guarded>.lock` (`guarded` with its extension replaced), released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// The lock file that guards `guarded`: `tars/<sha>.tar` → `tars/<sha>.lock`, `trees/<sha>` → `trees/<sha>.lock`.
pub fn lock_path(guarded: &Path) -> PathBuf {
    guarded.with_extension("lock")
}

fn open_lock_file(guarded: &Path) -> std::io::Result<File> {
    let path = lock_path(guarded);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
}

/// Waits for the exclusive lock of `guarded`.
pub fn lock(guarded: &Path) -> std::io::Result<FileLock> {
    let file = open_lock_file(guarded)?;
    file.lock()?;
    Ok(FileLock { _file: file })
}

/// The exclusive lock of `guarded` if nobody holds it now.
pub fn try_lock(guarded: &Path) -> std::io::Result<Option<FileLock>> {
    let file = open_lock_file(guarded)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(FileLock { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// A unique temporary path in `dir` for building `dir/<name>`.
pub fn temporary(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        ".{name}.{}{TEMPORARY_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// What the temporary `file_name` (as made by [`temporary`]) was building, if it is one.
pub fn temporary_target(file_name: &str) -> Option<&str> {
    let inner = file_name
        .strip_prefix('.')?
        .strip_suffix(TEMPORARY_SUFFIX)?;
    let (name, unique) = inner.rsplit_once('.')?;
    (unique.len() == 32 && unique.bytes().all(|b| b.is_ascii_hexdigit()) && !name.is_empty())
        .then_some(name)
}

/// Writes `bytes` to `path` through a unique temporary and a rename, with `mtime` if given.
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mtime: Option<std::time::SystemTime>,
) -> std::io::Result<()> {
    let (dir, name) = split(path)?;
    let tmp = temporary(dir, name);
    let written = (|| {
        std::fs::write(&tmp, bytes)?;
        if let Some(mtime) = mtime {
            File::options()
                .write(true)
                .open(&tmp)?
                .set_modified(mtime)?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn split(path: &Path) -> std::io::Result<(&Path, &str)> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file in a directory", path.display()),
        )),
    }
}

/// Removes the temporaries in `dir` whose writer is gone (the lock of what they were building is free, or is
/// `held` by the caller: a lock file cannot be taken twice, even by one process); returns what it removed. A
/// temporary whose writer still holds its lock is left alone.
pub fn remove_interrupted(dir: &Path, held: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut removed = vec![];
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(target) = file_name.to_str().and_then(temporary_target) else {
            continue;
        };
        let _free = match held == Some(target) {
            true => None,
            false => match try_lock(&dir.join(target))? {
                Some(free) => Some(free),
                None => continue,
            },
        };
        let path = entry.path();
        remove_all(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// Removes a file or a directory tree; one already gone is fine.
pub fn remove_all(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_name_what_they_build_and_nothing_else_is_taken_for_one() {
        let dir = Path::new("/cache");
        let tmp = temporary(dir, "abc.tar");
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temporary_target(name), Some("abc.tar"));
        assert_ne!(tmp, temporary(dir, "abc.tar"), "every temporary is unique");
        for not_one in [
            "abc.tar",
            ".abc.tar",
            ".abc.tar.tmp",
            ".abc.tar.xyz.tmp",
            "..0123456789abcdef0123456789abcdef.tmp",
        ] {
            assert_eq!(temporary_target(not_one), None, "{not_one}");
        }
    }
}
