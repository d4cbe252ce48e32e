//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod fakes;
pub mod postgres;

use std::path::PathBuf;

/// The variable that lets a machine without Docker run the rest of the suite: Docker tests then skip, loudly.
pub const SKIP_DOCKER: &str = "RUNNER_TEST_SKIP_DOCKER";

/// Whether the Docker tests may run: a daemon answers `/_ping`. A missing daemon fails the calling test unless
/// `RUNNER_TEST_SKIP_DOCKER=1` is set; then this says on the real stderr that the test was skipped and returns
/// `false`. Call it at the top of every test that needs Docker and return early when it says `false`.
pub fn docker_available() -> bool {
    let socket = docker_socket();
    if ping_unix(&socket) {
        return true;
    }
    docker_missing(&socket, std::env::var(SKIP_DOCKER).ok().as_deref())
}

/// What a test does when no daemon answers at `socket`, given the value of `RUNNER_TEST_SKIP_DOCKER`.
fn docker_missing(socket: &str, opt_out: Option<&str>) -> bool {
    if opt_out != Some("1") {
        panic!(
            "no Docker daemon answers /_ping at {socket}: start dockerd (bash tools/setup.sh does), or set \
             {SKIP_DOCKER}=1 to skip the tests that need it"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a Docker test")
        .to_owned();
    // The real stderr, not the captured test output: a skip must be seen even when the test "passes".
    let line = format!(
        "\n*** SKIPPED {test}: no Docker daemon answers at {socket} and {SKIP_DOCKER}=1 ***\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

/// The daemon socket `DOCKER_HOST` names (default `/var/run/docker.sock`).
pub fn docker_socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
}

fn ping_unix(socket: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.contains(" 200 ")
}

/// The workspace root (where `Cargo.toml` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The static in-container agent, built once per test process (cargo serialises concurrent builds).
pub fn static_agent() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let status = std::process::Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-q",
                    "-p",
                    "runner-agent",
                    "--release",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the static agent failed");
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("x86_64-unknown-linux-gnu/release/opschain-agent")
        })
        .clone()
}

/// Builds the base runner image once per test process (a no-op when its inputs did not change).
pub fn base_image() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        static_agent();
        let home = workspace_root().join("target/test-base-image-home");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["image", "build-base"])
            .env("RUNNER_HOME", &home)
            .output()
            .expect("runner runs");
        assert!(
            out.status.success(),
            "runner image build-base failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A data directory with the demo project (fixtures/demo as a git repository) and its `dev` and `prod`
/// environments, driven through the real `runner` binary.
pub struct Demo {
    pub home: tempfile::TempDir,
    pub repo: PathBuf,
}

pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

impl Demo {
    pub fn new() -> Demo {
        base_image();
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("demo-repo");
        copy_dir(&workspace_root().join("fixtures/demo"), &repo);
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "demo project"]);
        let demo = Demo { home, repo };
        let fixtures = workspace_root().join("fixtures/demo-properties");
        demo.ok(&[
            "project",
            "create",
            "--code",
            "demo",
            "--name",
            "Demo",
            "--git-remote",
            demo.repo.to_str().unwrap(),
        ]);
        for env in ["dev", "prod"] {
            demo.ok(&[
                "environment",
                "create",
                "--project",
                "demo",
                "--code",
                env,
                "--name",
                env,
            ]);
            demo.ok(&[
                "environment",
                "set-properties",
                "--project",
                "demo",
                "--environment",
                env,
                "--file",
                fixtures.join("dev.json").to_str().unwrap(),
            ]);
        }
        demo.ok(&[
            "project",
            "set-properties",
            "--project",
            "demo",
            "--file",
            fixtures.join("project.json").to_str().unwrap(),
        ]);
        demo
    }

    /// Writes the operator's policy file of this data directory (what the demo may use beyond the defaults).
    pub fn set_policy(&self, toml: &str) {
        std::fs::write(self.home.path().join("policy.toml"), toml).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(args)
            .env("RUNNER_HOME", self.home.path())
            .env("RUNNER_STOP_GRACE", "2s");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("runner runs")
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "runner {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `change create` in the foreground on `env`; returns (success, stdout, stderr).
    pub fn change(&self, env: &str, action: &str) -> (bool, String, String) {
        let out = self.run(&create_args(env, action, &[]));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&args)).expect("JSON output")
    }

    /// The last change's id.
    pub fn last_change(&self) -> String {
        self.json(&["change", "list"])[0]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// The arguments of `runner change create` for the demo project at `main`, then `extra`.
pub fn create_args<'a>(env: &'a str, action: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "change",
        "create",
        "--project",
        "demo",
        "--environment",
        env,
        "--git-rev",
        "main",
        "--action",
        action,
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `check` on every `(name, case)` of a table, in order. A case that fails panics again with its name in
/// front of its own message, so the failure says which row broke (the first failing row ends the test).
pub fn each_case<N: std::fmt::Display, C>(
    cases: impl IntoIterator<Item = (N, C)>,
    mut check: impl FnMut(C),
) {
    for (name, case) in cases {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case)));
        if let Err(panic) = outcome {
            fail_case(name, panic);
        }
    }
}

/// [`each_case`] for a `check` that awaits.
pub async fn each_case_async<N: std::fmt::Display, C, F: std::future::Future<Output = ()>>(
    cases: impl IntoIterator<Item = (N, C)>,
    mut check: impl FnMut(C) -> F,
) {
    use futures::FutureExt;
    for (name, case) in cases {
        let outcome = std::panic::AssertUnwindSafe(check(case))
            .catch_unwind()
            .await;
        if let Err(panic) = outcome {
            fail_case(name, panic);
        }
    }
}

fn fail_case(name: impl std::fmt::Display, panic: Box<dyn std::any::Any + Send>) -> ! {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)");
    panic!("case {name}: {message}");
}
