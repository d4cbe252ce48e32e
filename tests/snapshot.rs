//! Mirrors, revisions and repo.tar against real git repositories.

use runner::snapshot::{mirror_path, repo_tar, Mirror};
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// A work repository with two commits on main, a `feature` branch and a `v1` tag on the first commit.
struct Work {
    dir: tempfile::TempDir,
    first: String,
    second: String,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z")
        .env("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn work() -> Work {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    git(d, &["init", "-q", "-b", "main"]);
    std::fs::create_dir_all(d.join(".opschain/environments")).unwrap();
    std::fs::write(
        d.join(".opschain/properties.json"),
        r#"{"a": {"x": 1}, "list": [1]}"#,
    )
    .unwrap();
    std::fs::write(
        d.join(".opschain/environments/dev.yaml"),
        "a:\n  y: 2\nlist: [2]\n",
    )
    .unwrap();
    std::fs::write(d.join(".opschain/environments/prod.toml"), "[a]\nz = 3\n").unwrap();
    std::fs::write(d.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::os::unix::fs::symlink("run.sh", d.join("link")).unwrap();
    let mut perms = std::fs::metadata(d.join("run.sh")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(d.join("run.sh"), perms).unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "first"]);
    let first = git(d, &["rev-parse", "HEAD"]);
    git(d, &["tag", "v1"]);
    git(d, &["branch", "feature"]);
    std::fs::write(d.join("second.txt"), "2").unwrap();
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "second"]);
    let second = git(d, &["rev-parse", "HEAD"]);
    Work { dir, first, second }
}

fn mirror(home: &Path, work: &Work) -> Mirror {
    let m = Mirror::open(
        &mirror_path(home, "demo"),
        work.dir.path().to_str().unwrap(),
    )
    .unwrap();
    m.fetch().unwrap();
    m
}

#[test]
fn revisions_resolve_once_to_full_shas() {
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let m = mirror(home.path(), &w);
    assert_eq!(m.resolve("main").unwrap(), w.second);
    assert_eq!(m.resolve("feature").unwrap(), w.first);
    assert_eq!(m.resolve("v1").unwrap(), w.first);
    assert_eq!(m.resolve(&w.second[..7]).unwrap(), w.second);
    assert_eq!(m.resolve(&w.first).unwrap(), w.first);
    assert_eq!(m.resolve("main~1").unwrap(), w.first);
    let err = m.resolve("no-such-branch").unwrap_err().to_string();
    assert!(
        err.contains("revision \"no-such-branch\" does not exist in"),
        "{err}"
    );
    assert!(err.contains(w.dir.path().to_str().unwrap()), "{err}");
    // A new commit on the branch is seen after the next fetch only.
    std::fs::write(w.dir.path().join("third.txt"), "3").unwrap();
    git(w.dir.path(), &["add", "-A"]);
    git(w.dir.path(), &["commit", "-q", "-m", "third"]);
    assert_eq!(m.resolve("main").unwrap(), w.second);
    m.fetch().unwrap();
    assert_ne!(m.resolve("main").unwrap(), w.second);
}

#[test]
fn files_and_repository_properties_at_a_commit() {
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let m = mirror(home.path(), &w);
    assert_eq!(
        m.read_file(&w.first, "run.sh").unwrap().unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(m.read_file(&w.first, "second.txt").unwrap(), None);
    assert_eq!(m.read_file(&w.second, "second.txt").unwrap().unwrap(), b"2");
    assert_eq!(
        m.read_file(&w.second, ".opschain").unwrap(),
        None,
        "a directory is not a file"
    );
    assert_eq!(
        m.repository_properties(&w.first, "dev").unwrap(),
        json!({"a": {"x": 1, "y": 2}, "list": [2]})
    );
    assert_eq!(
        m.repository_properties(&w.first, "prod").unwrap(),
        json!({"a": {"x": 1, "z": 3}, "list": [1]})
    );
    assert_eq!(
        m.repository_properties(&w.first, "qa").unwrap(),
        json!({"a": {"x": 1}, "list": [1]})
    );

    std::fs::write(w.dir.path().join(".opschain/properties.json"), "{\"a\": ").unwrap();
    git(w.dir.path(), &["commit", "-q", "-am", "broken"]);
    m.fetch().unwrap();
    let broken = m.resolve("main").unwrap();
    let err = m
        .repository_properties(&broken, "dev")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(".opschain/properties.json at ") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn repo_tar_is_deterministic_complete_and_never_rewritten() {
    let w = work();
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ma, mb) = (mirror(home_a.path(), &w), mirror(home_b.path(), &w));
    let a = repo_tar(&ma, &w.second, &home_a.path().join("cache")).unwrap();
    let b = repo_tar(&mb, &w.second, &home_b.path().join("cache")).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&b).unwrap(),
        "two builds of one SHA must be byte-identical"
    );

    let modified = std::fs::metadata(&a).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        repo_tar(&ma, &w.second, &home_a.path().join("cache")).unwrap(),
        a
    );
    assert_eq!(
        std::fs::metadata(&a).unwrap().modified().unwrap(),
        modified,
        "the cached tar is not touched"
    );

    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut paths = vec![];
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
        assert_eq!(h.mtime().unwrap(), 1767323045, "the commit time");
        assert_eq!(h.username().unwrap(), Some(""));
        let path = entry.path().unwrap().display().to_string();
        if path == "run.sh" {
            assert_eq!(h.mode().unwrap(), 0o755);
        }
        if path == "second.txt" {
            assert_eq!(h.mode().unwrap(), 0o644);
        }
        if path == "link" {
            assert_eq!(h.entry_type(), tar::EntryType::Symlink);
        }
        paths.push(path);
    }
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert!(paths.contains(&".git/HEAD".to_string()));

    // Inside, it is a repository at that commit, with history and a clean work tree.
    let out = tempfile::tempdir().unwrap();
    tar::Archive::new(bytes.as_slice())
        .unpack(out.path())
        .unwrap();
    assert_eq!(git(out.path(), &["log", "-1", "--format=%H"]), w.second);
    assert_eq!(git(out.path(), &["log", "--format=%s"]), "second\nfirst");
    assert_eq!(git(out.path(), &["status", "--porcelain"]), "");
}

/// Parallel steps of one change ask for the same repo.tar at once (CI once failed here: two builders shared a
/// temporary file and the loser's rename found it gone).
#[test]
fn concurrent_requests_for_one_sha_all_get_the_same_tar() {
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("cache");
    mirror(home.path(), &w);
    let tars: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (cache, sha) = (&cache, &w.second);
                let remote = w.dir.path().to_str().unwrap();
                let path = mirror_path(home.path(), "demo");
                s.spawn(move || {
                    let m = Mirror::open(&path, remote).unwrap();
                    let tar = repo_tar(&m, sha, cache).expect("every request gets the tar");
                    std::fs::read(tar).unwrap()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert!(tars.windows(2).all(|p| p[0] == p[1]));
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary files left: {leftovers:?}"
    );
}

#[test]
fn an_interrupted_fetch_leaves_nothing_after_the_next_fetch() {
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let m = mirror(home.path(), &w);
    // What libgit2 leaves when the runner is killed while it receives a pack.
    let scratch = mirror_path(home.path(), "demo").join("objects/pack/pack_git2_8f3a1c");
    std::fs::write(&scratch, vec![0u8; 64 * 1024]).unwrap();
    m.fetch().unwrap();
    assert!(
        !scratch.exists(),
        "the next fetch removed the interrupted one's pack"
    );
    assert_eq!(
        m.resolve("main").unwrap(),
        w.second,
        "and the mirror still works"
    );
}

#[test]
fn interrupted_tar_builds_are_removed_by_the_next_build_but_a_live_one_is_kept() {
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let m = mirror(home.path(), &w);
    let cache = home.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let dead_tar = runner::cache::files::temporary(&cache, &format!("{}.tar", w.first));
    std::fs::write(&dead_tar, b"half a tar").unwrap();
    let dead_scratch = runner::cache::files::temporary(&cache, "0123abcd.tar");
    std::fs::create_dir_all(dead_scratch.join("pack")).unwrap();
    // A builder of another SHA that is still alive: it holds that SHA's lock.
    let live_target = cache.join("feedface.tar");
    let _live = runner::cache::files::lock(&live_target).unwrap();
    let live_tmp = runner::cache::files::temporary(&cache, "feedface.tar");
    std::fs::write(&live_tmp, b"being written").unwrap();

    repo_tar(&m, &w.second, &cache).unwrap();
    assert!(!dead_tar.exists() && !dead_scratch.exists());
    assert!(
        live_tmp.exists(),
        "a live builder's temporary is left alone"
    );
    // The interrupted SHA builds fine afterwards.
    let tar = repo_tar(&m, &w.first, &cache).unwrap();
    assert!(std::fs::metadata(tar).unwrap().len() > 1000);
}

#[test]
fn a_cache_whose_lock_file_cannot_be_made_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let w = work();
    let home = tempfile::tempdir().unwrap();
    let m = mirror(home.path(), &w);
    let err = repo_tar(&m, &w.second, &not_a_dir.join("cache")).unwrap_err();
    assert!(
        err.to_string().contains(&not_a_dir.display().to_string()),
        "{err}"
    );
    assert!(runner::cache::files::lock(&not_a_dir.join("x.tar")).is_err());
}
