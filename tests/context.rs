//! The build context: a golden plan, stable files on disk, and `runner dev create-dockerfile`.

use runner::context::{
    plan, write, write_default_dockerfile, ContextInputs, DockerfileSource, DEFAULT_DOCKERFILE,
};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it)"
    );
}

fn inputs<'a>(
    properties: &'a serde_json::Value,
    context: &'a serde_json::Value,
    dockerfile: Option<&'a [u8]>,
) -> ContextInputs<'a> {
    ContextInputs {
        repository_dockerfile: dockerfile,
        properties,
        context,
        git_rev: "main",
        git_sha: "0123456789abcdef0123456789abcdef01234567",
        base_runner: "runner/opschain-runner:0.1.0",
        runner_user: "0:0",
    }
}

#[test]
fn default_plan_matches_the_golden_file() {
    let properties = json!({"app": {"x": 1}, "opschain": {"env": {"B": "2", "A": "1"}, "env:runner_secrets": ["s"]}});
    let context = json!({"project": {"code": "demo", "name": "Demo"}, "environment": {"code": "dev", "name": "Dev"}});
    let plan = plan(&inputs(&properties, &context, None)).unwrap();
    assert_eq!(plan.dockerfile_source, DockerfileSource::Default);
    assert_eq!(plan.dockerfile, DEFAULT_DOCKERFILE.as_bytes());
    golden(
        "context_plan_default.json",
        &(serde_json::to_string_pretty(&plan).unwrap() + "\n"),
    );
}

#[test]
fn repository_dockerfile_wins_and_bad_env_is_refused() {
    let context = json!({});
    let custom = b"FROM scratch\n".as_slice();
    let plan = plan(&inputs(&json!({}), &context, Some(custom))).unwrap();
    assert_eq!(plan.dockerfile_source, DockerfileSource::Repository);
    assert_eq!(plan.dockerfile, custom);
    let bad = json!({"opschain": {"env": {"N": 1}}});
    let err = runner::context::plan(&inputs(&bad, &context, None)).unwrap_err();
    assert!(
        err.to_string()
            .contains("`opschain.env.N` must be a string"),
        "{err}"
    );
}

#[test]
fn written_context_keeps_stable_files() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("cached.tar");
    std::fs::write(&tar, b"tar bytes").unwrap();
    let properties = json!({"opschain": {"env": {"A": "1"}}});
    let context = json!({});
    let plan = plan(&inputs(&properties, &context, None)).unwrap();
    let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let written = write(&plan, &tar, &dir.path().join("ctx"), mtime).unwrap();
    let env_file = written.context_dir.join("step_context_env.json");
    let stat = |p: &PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(stat(&env_file), mtime);
    assert_eq!(
        std::fs::read(written.context_dir.join("repo.tar")).unwrap(),
        b"tar bytes"
    );
    assert_eq!(
        stat(&written.context_dir.join("repo.tar")),
        stat(&tar),
        "a hard link keeps the cached mtime"
    );
    assert_eq!(
        std::fs::read(written.dockerfile_dir.join("Dockerfile")).unwrap(),
        DEFAULT_DOCKERFILE.as_bytes()
    );
    let again = write(
        &plan,
        &tar,
        &dir.path().join("ctx"),
        mtime + Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(again, written);
    assert_eq!(stat(&env_file), mtime, "unchanged bytes are not rewritten");
}

#[test]
fn create_dockerfile_refuses_to_overwrite_without_force() {
    let repo = tempfile::tempdir().unwrap();
    let path = write_default_dockerfile(repo.path(), false).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), DEFAULT_DOCKERFILE);
    std::fs::write(&path, "mine").unwrap();
    let err = write_default_dockerfile(repo.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(".opschain/Dockerfile exists already: pass --force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "mine",
        "nothing lost"
    );
    write_default_dockerfile(repo.path(), true).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), DEFAULT_DOCKERFILE);
}

fn demo_plan() -> runner::context::ContextPlan {
    let properties = json!({"opschain": {"env": {"A": "1"}}});
    plan(&inputs(&properties, &json!({}), None)).unwrap()
}

/// Two steps with one content key write one context directory at once. A writer must never copy onto a hard
/// link of the cached repo.tar: that truncates the cache itself.
#[test]
fn concurrent_context_writes_never_truncate_the_cached_repo_tar() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("cached.tar");
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&tar, &bytes).unwrap();
    let plan = demo_plan();
    let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let start = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for round in 0..100 {
                    // Every writer starts on the same fresh directory at once.
                    start.wait();
                    let ctx = dir.path().join(format!("ctx{round}"));
                    if let Err(e) = write(&plan, &tar, &ctx, mtime) {
                        panic!("{e}");
                    }
                    let linked = std::fs::metadata(ctx.join("context/repo.tar")).unwrap();
                    assert_eq!(linked.len(), bytes.len() as u64, "round {round}");
                }
            });
        }
    });
    assert_eq!(
        std::fs::read(&tar).unwrap(),
        bytes,
        "the cached repo.tar kept its bytes"
    );
    let written = write(&plan, &tar, &dir.path().join("ctx0"), mtime).unwrap();
    assert_eq!(
        std::fs::read(written.context_dir.join("repo.tar")).unwrap(),
        bytes
    );
    let leftovers: Vec<_> = std::fs::read_dir(&written.context_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no temporaries left: {leftovers:?}");
}

#[test]
fn a_context_holding_another_tar_gets_the_right_one_and_the_other_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.tar"), dir.path().join("new.tar"));
    std::fs::write(&old, b"old commit").unwrap();
    std::fs::write(&new, b"new commit").unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("context")).unwrap();
    std::fs::hard_link(&old, ctx.join("context/repo.tar")).unwrap();
    let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let written = write(&demo_plan(), &new, &ctx, mtime).unwrap();
    assert_eq!(
        std::fs::read(written.context_dir.join("repo.tar")).unwrap(),
        b"new commit"
    );
    assert_eq!(
        std::fs::read(&old).unwrap(),
        b"old commit",
        "replaced by a rename, not written through the link"
    );
}

#[test]
fn a_context_on_another_filesystem_gets_a_complete_copy_with_the_fixed_mtime() {
    // /dev/shm is a tmpfs: a hard link from the temporary directory cannot reach it.
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        panic!("this test needs a writable /dev/shm (a tmpfs on every Linux machine)");
    };
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("cached.tar");
    std::fs::write(&tar, b"tar bytes").unwrap();
    let mtime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let written = write(&demo_plan(), &tar, &shm.path().join("ctx"), mtime).unwrap();
    let copied = written.context_dir.join("repo.tar");
    assert_eq!(std::fs::read(&copied).unwrap(), b"tar bytes");
    assert_eq!(
        std::fs::metadata(&copied).unwrap().modified().unwrap(),
        mtime
    );
    let again = write(&demo_plan(), &tar, &shm.path().join("ctx"), mtime).unwrap();
    assert_eq!(again, written);
    assert_eq!(std::fs::read(&tar).unwrap(), b"tar bytes");
}
