//! `repo.tar` owned by a base image's user. BuildKit's `ADD` unpacks a tar with the owners its headers name and
//! (as the Engine's BuildKit does today) ignores `--chown` for what it unpacks, so a base image whose `USER` is not
//! root gets a copy of the cached tar whose headers name that user — the repository is then theirs, and the agent
//! and the action can write in `/opt/opschain` with any Dockerfile, the default or a repository's own.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::ContextError;

/// `repo_tar`, or (for a non-root `user`, a numeric `uid:gid`) a copy beside it whose every entry belongs to `user`,
/// written once and kept with the same mtime as the original (so BuildKit sees an unchanged file the next time).
pub fn repo_tar_for_user(repo_tar: &Path, user: &str) -> Result<PathBuf, ContextError> {
    let (uid, gid) = parse_user(user).ok_or_else(|| ContextError::User {
        user: user.to_owned(),
    })?;
    if (uid, gid) == (0, 0) {
        return Ok(repo_tar.to_owned());
    }
    let stem = repo_tar
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let owned = repo_tar.with_file_name(format!("{stem}.{uid}-{gid}.tar"));
    if owned.exists() {
        return Ok(owned);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ContextError::Io { path, source }
    };
    // A unique temporary name, renamed into place: concurrent steps may write the same copy.
    let dir = owned.parent().unwrap_or(Path::new("."));
    let name = owned
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = crate::cache::files::temporary(dir, &name);
    let written = (|| {
        let input = std::fs::File::open(repo_tar)?;
        let output = std::fs::File::create(&tmp)?;
        let mut writer = BufWriter::new(&output);
        rewrite_owners(BufReader::new(input), &mut writer, uid, gid)?;
        writer.flush()?;
        drop(writer);
        output.set_modified(std::fs::metadata(repo_tar)?.modified()?)?;
        std::fs::rename(&tmp, &owned)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&owned)(source));
    }
    Ok(owned)
}

/// `uid:gid`, both numeric.
fn parse_user(user: &str) -> Option<(u64, u64)> {
    let (uid, gid) = user.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// Copies a tar stream, setting the owner of every header block (data blocks are copied as they are).
fn rewrite_owners(
    mut input: impl Read,
    output: &mut impl Write,
    uid: u64,
    gid: u64,
) -> std::io::Result<()> {
    let mut block = [0u8; 512];
    loop {
        if !read_block(&mut input, &mut block)? {
            return Ok(());
        }
        if block.iter().all(|b| *b == 0) {
            // The end-of-archive marker: copy it and whatever padding follows.
            output.write_all(&block)?;
            std::io::copy(&mut input, output)?;
            return Ok(());
        }
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&block);
        let size = header.entry_size()?;
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_cksum();
        output.write_all(header.as_bytes())?;
        let padded = size.div_ceil(512) * 512;
        let copied = std::io::copy(&mut (&mut input).take(padded), output)?;
        if copied != padded {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the tar ends inside an entry",
            ));
        }
    }
}

/// Reads one 512-byte block; `false` at a clean end of the stream.
fn read_block(input: &mut impl Read, block: &mut [u8; 512]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < block.len() {
        match input.read(&mut block[filled..])? {
            0 if filled == 0 => return Ok(false),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the tar ends inside a header",
                ))
            }
            n => filled += n,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("abc.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
        // As repo.tar's headers are: root-owned.
        let new_header = || {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1);
            header
        };
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        tar.append_data(&mut header, ".opschain/", std::io::empty())
            .unwrap();
        let long = format!("{}/file.txt", "d".repeat(150));
        for (name, data) in [
            (".opschain/actions.json", &b"{}"[..]),
            (long.as_str(), b"x"),
        ] {
            let mut header = new_header();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, name, data).unwrap();
        }
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        tar.append_link(&mut header, "link", "e".repeat(120))
            .unwrap();
        tar.finish().unwrap();
        path
    }

    #[test]
    fn every_entry_of_the_copy_belongs_to_the_user_and_nothing_else_changes() {
        let dir = tempfile::tempdir().unwrap();
        let original = sample(dir.path());
        let owned = repo_tar_for_user(&original, "1000:1001").unwrap();
        assert_ne!(owned, original);
        let read = |path: &Path| {
            let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
            archive
                .entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let mut data = vec![];
                    e.read_to_end(&mut data).unwrap();
                    let h = e.header();
                    (
                        e.path().unwrap().into_owned(),
                        e.link_name().unwrap().map(|l| l.into_owned()),
                        h.mode().unwrap(),
                        h.uid().unwrap(),
                        h.gid().unwrap(),
                        data,
                    )
                })
                .collect::<Vec<_>>()
        };
        let (before, after) = (read(&original), read(&owned));
        assert_eq!(before.len(), 4);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!((&b.0, &b.1, b.2, &b.5), (&a.0, &a.1, a.2, &a.5));
            assert_eq!((b.3, b.4), (0, 0));
            assert_eq!((a.3, a.4), (1000, 1001));
        }
        assert_eq!(
            std::fs::metadata(&owned).unwrap().modified().unwrap(),
            std::fs::metadata(&original).unwrap().modified().unwrap()
        );
        assert_eq!(repo_tar_for_user(&original, "0:0").unwrap(), original);
        assert_eq!(repo_tar_for_user(&original, "1000:1001").unwrap(), owned);
        let err = repo_tar_for_user(&original, "app").unwrap_err().to_string();
        assert!(err.contains("\"app\""), "{err}");
    }
}
