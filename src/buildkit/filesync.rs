//! The sending side of fsutil's DiffCopy protocol, which is how BuildKit reads a local directory (the build
//! context, the Dockerfile's directory) from the client. We list every entry as a STAT packet (sorted, directories
//! before their contents, then an empty STAT); the daemon asks (REQ) only for files whose size or mtime differ
//! from what it has cached; we answer each with DATA chunks and an empty DATA; both sides end with FIN.
//!
//! Everything is read through a directory handle (cap-std): a symlink inside the synced directory is listed as a
//! symlink, never followed, and a file's content is opened beneath the handle, so nothing outside it is served.

use bollard_buildkit_proto::fsutil::types::{packet::PacketType, Packet, Stat};
use cap_std::fs::{Dir, MetadataExt};
use std::path::{Path, PathBuf};

/// Go's `os.FileMode` bits, which fsutil puts on the wire.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;
/// DATA chunk size.
const CHUNK: usize = 32 * 1024;

/// One entry of a synced directory.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncEntry {
    /// Relative, `/`-separated.
    pub path: String,
    pub stat: Stat,
    /// The file to read for DATA (regular files only), relative to the synced directory.
    pub source: Option<PathBuf>,
}

/// Lists `dir` depth-first with names sorted in each directory (the order fsutil's walker produces and its
/// receiver expects), keeping the entries `include` selects (all when `include` is empty).
pub fn list(dir: &Dir, include: &[String]) -> std::io::Result<Vec<SyncEntry>> {
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    if include.is_empty() {
        return Ok(out);
    }
    let wanted = |path: &str| include.iter().any(|pattern| matches(pattern, path));
    // Keep included entries, everything below an included directory, and the directories leading to them.
    let keep: Vec<bool> = out
        .iter()
        .map(|e| {
            wanted(&e.path)
                || include
                    .iter()
                    .any(|p| e.path.starts_with(&format!("{}/", p.trim_end_matches('/'))))
                || out.iter().any(|other| {
                    other.path.starts_with(&format!("{}/", e.path)) && wanted(&other.path)
                })
        })
        .collect();
    Ok(out
        .into_iter()
        .zip(keep)
        .filter_map(|(e, k)| k.then_some(e))
        .collect())
}

/// Glob matching of one pattern against a path: `*` within a segment, `**` across segments.
fn matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) if p.get(1) == Some(&b'*') => {
                (0..=s.len()).any(|i| go(&p[2..], &s[i..]))
            }
            (Some(b'*'), _) => (0..=s.len())
                .take_while(|i| *i == 0 || s[i - 1] != b'/')
                .any(|i| go(&p[1..], &s[i..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
    go(pattern.as_bytes(), path.as_bytes())
}

fn walk(dir: &Dir, prefix: &str, out: &mut Vec<SyncEntry>) -> std::io::Result<()> {
    let mut names: Vec<_> = dir.entries()?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        // The entry itself, not what a symlink points at.
        let meta = entry.metadata()?;
        let linkname = if meta.file_type().is_symlink() {
            dir.read_link_contents(entry.file_name())?
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        let stat = stat_of(&path, &meta, linkname);
        let source = meta.is_file().then(|| PathBuf::from(&path));
        out.push(SyncEntry {
            path: path.clone(),
            stat,
            source,
        });
        if meta.is_dir() {
            walk(&entry.open_dir()?, &path, out)?;
        }
    }
    Ok(())
}

fn stat_of(rel: &str, meta: &cap_std::fs::Metadata, linkname: String) -> Stat {
    let perm = meta.mode() & 0o7777;
    let mode = if meta.is_dir() {
        GO_MODE_DIR | perm
    } else if meta.file_type().is_symlink() {
        GO_MODE_SYMLINK | perm
    } else {
        perm
    };
    Stat {
        path: rel.to_owned(),
        mode,
        uid: meta.uid(),
        gid: meta.gid(),
        size: if meta.is_file() {
            meta.size() as i64
        } else {
            0
        },
        mod_time: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        linkname,
        ..Default::default()
    }
}

fn packet(kind: PacketType) -> Packet {
    Packet {
        r#type: kind as i32,
        ..Default::default()
    }
}

/// The STAT packets that open a DiffCopy: one per entry, then an empty one.
pub fn stat_packets(entries: &[SyncEntry]) -> Vec<Packet> {
    entries
        .iter()
        .map(|e| Packet {
            stat: Some(e.stat.clone()),
            ..packet(PacketType::PacketStat)
        })
        .chain(std::iter::once(packet(PacketType::PacketStat)))
        .collect()
}

/// What to answer a packet from the receiver with.
#[derive(Debug)]
pub enum Reply {
    /// Send this file's content as DATA packets for `id`.
    File { id: u32, source: PathBuf },
    /// The receiver is done: answer FIN and stop.
    Fin,
    /// Nothing to send.
    None,
}

/// Decides the reply to one packet from the receiver; an ERR packet or a REQ for an unknown id is an error.
pub fn reply(entries: &[SyncEntry], received: &Packet) -> Result<Reply, String> {
    match PacketType::try_from(received.r#type) {
        Ok(PacketType::PacketReq) => {
            let entry = entries
                .get(received.id as usize)
                .ok_or_else(|| format!("the daemon asked for unknown file id {}", received.id))?;
            match &entry.source {
                Some(source) => Ok(Reply::File {
                    id: received.id,
                    source: source.clone(),
                }),
                None => Err(format!(
                    "the daemon asked for the content of {}, which is not a file",
                    entry.path
                )),
            }
        }
        Ok(PacketType::PacketFin) => Ok(Reply::Fin),
        Ok(PacketType::PacketErr) => Err(format!(
            "the daemon reported: {}",
            String::from_utf8_lossy(&received.data)
        )),
        _ => Ok(Reply::None),
    }
}

/// Streams the file `source` of `dir` as DATA packets for `id`, ending with an empty one.
pub async fn send_file(
    id: u32,
    dir: &Dir,
    source: &Path,
    out: &tokio::sync::mpsc::Sender<Result<Packet, tonic::Status>>,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let file = dir
        .open(source)
        .map_err(|e| format!("cannot open {}: {e}", source.display()))?;
    let mut file = tokio::fs::File::from_std(file.into_std());
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
        let data = buf[..n].to_vec();
        let done = n == 0;
        if out
            .send(Ok(Packet {
                id,
                data,
                ..packet(PacketType::PacketData)
            }))
            .await
            .is_err()
        {
            return Err("the daemon closed the file sync".into());
        }
        if done {
            return Ok(());
        }
    }
}

pub fn fin() -> Packet {
    packet(PacketType::PacketFin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> Dir {
        Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap()
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        std::fs::write(dir.path().join("b/c/file"), b"x").unwrap();
        std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
        std::fs::write(dir.path().join("Dockerfile"), b"FROM scratch").unwrap();
        std::os::unix::fs::symlink("a.txt", dir.path().join("link")).unwrap();
        dir
    }

    #[test]
    fn lists_depth_first_sorted_with_go_modes() {
        let dir = tree();
        let entries = list(&open(&dir), &[]).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["Dockerfile", "a.txt", "b", "b/c", "b/c/file", "link"]
        );
        assert_ne!(entries[2].stat.mode & GO_MODE_DIR, 0);
        assert_eq!(entries[1].stat.size, 5);
        assert_eq!(entries[5].stat.linkname, "a.txt");
        assert_ne!(entries[5].stat.mode & GO_MODE_SYMLINK, 0);
        let packets = stat_packets(&entries);
        assert_eq!(packets.len(), 7);
        assert!(
            packets.last().unwrap().stat.is_none(),
            "the listing ends with an empty STAT"
        );
    }

    #[test]
    fn include_patterns_select_entries_and_their_parents() {
        let dir = tree();
        let only = |p: &[&str]| -> Vec<String> {
            list(
                &open(&dir),
                &p.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect()
        };
        assert_eq!(only(&["Dockerfile"]), ["Dockerfile"]);
        assert_eq!(only(&["b/c/file"]), ["b", "b/c", "b/c/file"]);
        assert_eq!(only(&["b"]), ["b", "b/c", "b/c/file"]);
        assert_eq!(only(&["*.txt"]), ["a.txt"]);
    }

    #[test]
    fn replies_follow_the_protocol() {
        let dir = tree();
        let entries = list(&open(&dir), &[]).unwrap();
        let req = |id| Packet {
            id,
            ..packet(PacketType::PacketReq)
        };
        assert!(matches!(
            reply(&entries, &req(1)).unwrap(),
            Reply::File { id: 1, .. }
        ));
        assert!(
            reply(&entries, &req(2)).is_err(),
            "a directory has no content"
        );
        assert!(reply(&entries, &req(99)).is_err());
        assert!(matches!(reply(&entries, &fin()).unwrap(), Reply::Fin));
        let err = Packet {
            data: b"boom".to_vec(),
            ..packet(PacketType::PacketErr)
        };
        assert!(reply(&entries, &err).unwrap_err().contains("boom"));
    }

    #[test]
    fn symlinks_out_of_the_synced_directory_are_listed_as_links_never_followed() {
        let top = tempfile::tempdir().unwrap();
        std::fs::create_dir(top.path().join("secrets")).unwrap();
        std::fs::write(top.path().join("secrets/key"), b"host secret").unwrap();
        let repo = top.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::os::unix::fs::symlink("../secrets", repo.join("svc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", repo.join("passwd")).unwrap();
        let dir = Dir::open_ambient_dir(&repo, cap_std::ambient_authority()).unwrap();
        let entries = list(&dir, &[]).unwrap();
        let listed: Vec<(&str, &str, bool)> = entries
            .iter()
            .map(|e| {
                (
                    e.path.as_str(),
                    e.stat.linkname.as_str(),
                    e.stat.mode & GO_MODE_SYMLINK != 0,
                )
            })
            .collect();
        assert_eq!(
            listed,
            [("passwd", "/etc/passwd", true), ("svc", "../secrets", true)],
            "nothing below the links is listed"
        );
        assert!(entries.iter().all(|e| e.source.is_none()));
        // Even asked directly, a path through the link is not opened.
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sent = runtime.block_on(send_file(0, &dir, Path::new("svc/key"), &tx));
        assert!(sent.unwrap_err().contains("cannot open svc/key"));
    }

    #[tokio::test]
    async fn file_content_is_chunked_and_terminated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![7u8; CHUNK + 10]).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        send_file(3, &open(&dir), Path::new("big"), &tx)
            .await
            .unwrap();
        drop(tx);
        let mut sizes = vec![];
        while let Some(p) = rx.recv().await {
            let p = p.unwrap();
            assert_eq!((p.id, p.r#type), (3, PacketType::PacketData as i32));
            sizes.push(p.data.len());
        }
        assert_eq!(sizes, [CHUNK, 10, 0]);
    }
}
