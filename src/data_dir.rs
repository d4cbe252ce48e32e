//! The data directory's modes at rest: the directory itself 0700, the store (`runner.db` and its `-wal`/`-shm`)
//! and secret files 0600 — also when they already existed with looser modes, since an older runner or a careless
//! `cp` may have left them readable by others.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the data directory and every directory of secrets.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the store's files and of secret files.
pub const FILE_MODE: u32 = 0o600;

/// Creates `home` (and missing parents) and makes it 0700.
pub fn prepare(home: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(home)?;
    tighten(home, DIR_MODE)
}

/// Sets `path`'s permission bits to `mode` unless they are already no looser (a missing file is fine).
pub fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Ok(()),
        Ok(meta) if meta.permissions().mode() & 0o777 & !mode == 0 => Ok(()),
        Ok(_) => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes `db` exist with mode 0600 before SQLite opens it (SQLite gives `-wal` and `-shm` the database file's
/// mode), and tightens the three files if they are there already.
pub fn prepare_database(db: &Path) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(db)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        tighten(Path::new(&name), FILE_MODE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_looser_existing_directory_and_database_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        let db = home.join("runner.db");
        for file in ["runner.db", "runner.db-wal", "runner.db-shm"] {
            fs::write(home.join(file), b"").unwrap();
            fs::set_permissions(home.join(file), fs::Permissions::from_mode(0o644)).unwrap();
        }
        prepare(&home).unwrap();
        prepare_database(&db).unwrap();
        assert_eq!(mode(&home), 0o700);
        for file in ["runner.db", "runner.db-wal", "runner.db-shm"] {
            assert_eq!(mode(&home.join(file)), 0o600, "{file}");
        }
    }

    #[test]
    fn a_new_directory_and_database_are_private_from_the_start() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("a/b");
        prepare(&home).unwrap();
        prepare_database(&home.join("runner.db")).unwrap();
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("runner.db")), 0o600);
    }

    #[test]
    fn stricter_modes_are_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("f");
        fs::write(&file, b"").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o400)).unwrap();
        tighten(&file, FILE_MODE).unwrap();
        assert_eq!(mode(&file), 0o400);
        tighten(&root.path().join("missing"), FILE_MODE).unwrap();
    }
}
