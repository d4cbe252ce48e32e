//! Drives the real `runner` binary through the project/environment/properties/secret commands and their errors —
//! locally, and through `runner serve` with `--server` (same output, same exit codes).

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Runner {
    home: tempfile::TempDir,
    /// `runner serve` on loopback and its URL, in --server mode.
    server: Option<(std::process::Child, String)>,
    /// The server's data directory, kept while it runs.
    _server_home: Option<tempfile::TempDir>,
}

const TOKEN: &str = "cli-test-token";

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.server {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Runner {
    fn new() -> Runner {
        Runner {
            home: tempfile::tempdir().unwrap(),
            server: None,
            _server_home: None,
        }
    }

    /// A runner whose commands go to a `runner serve` of its own (with a separate data directory).
    fn with_server() -> Runner {
        let server_home = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("RUNNER_HOME", server_home.path())
            .env("RUNNER_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Runner {
            // The client's own data directory is not the server's: nothing may be read from it.
            home: tempfile::tempdir().unwrap(),
            server: Some((child, format!("http://127.0.0.1:{port}"))),
            _server_home: Some(server_home),
        };
        let start = std::time::Instant::now();
        while !r.run(&["project", "list"]).status.success() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "runner serve did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        r
    }

    fn remote(&self) -> bool {
        self.server.is_some()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(args)
            .env("RUNNER_HOME", self.home.path())
            .env_remove("RUNNER_OUTPUT")
            .env_remove("RUNNER_PROJECT")
            .env_remove("RUNNER_ENVIRONMENT")
            .env_remove("RUNNER_SERVER")
            .env_remove("RUNNER_TOKEN");
        if let Some((_, url)) = &self.server {
            cmd.env("RUNNER_SERVER", url).env("RUNNER_TOKEN", TOKEN);
        }
        cmd
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with `code`; returns stderr.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        stderr
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.home.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

const ENV: [&str; 4] = ["--project", "demo", "--environment", "dev"];

fn with<'a>(base: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(rest).copied().collect()
}

fn setup(r: Runner) -> Runner {
    r.ok(&[
        "project",
        "create",
        "--code",
        "demo",
        "--name",
        "Demo",
        "--git-remote",
        "/srv/git/demo",
    ]);
    r.ok(&[
        "environment",
        "create",
        "--project",
        "demo",
        "--code",
        "dev",
        "--name",
        "Dev",
    ]);
    r
}

fn show_env(r: &Runner) -> Value {
    serde_json::from_str(&r.ok(&with(&["environment", "show-properties"], &ENV))).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a test body locally and against `runner serve` (which needs Docker).
macro_rules! both_modes {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn local() {
                super::$name(super::Runner::new());
            }
            #[test]
            fn server() {
                if !super::support::docker_available() {
                    return;
                }
                super::$name(super::Runner::with_server());
            }
        }
    )*};
}

both_modes!(
    properties_lifecycle_and_history,
    errors_name_the_problem_and_change_nothing,
    concurrent_patches_from_two_processes_lose_nothing
);

fn properties_lifecycle_and_history(r: Runner) {
    let r = setup(r);
    let listed: Value =
        serde_json::from_str(&r.ok(&["project", "list", "--output", "json"])).unwrap();
    assert_eq!(listed[0]["code"], "demo");
    assert_eq!(listed[0]["git_remote"], "/srv/git/demo");
    let envs: Value = serde_json::from_str(&r.ok(&[
        "environment",
        "list",
        "--project",
        "demo",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(envs[0]["code"], "dev");

    let props = r.file(
        "props.json",
        r#"{"app": {"port": "80", "hosts": ["a"]}, "opschain": {"env": {"X": "1"}}}"#,
    );
    r.ok(&with(
        &["environment", "set-properties", "--file", p(&props)],
        &ENV,
    ));
    let patch = r.file(
        "patch.json",
        r#"[{"op": "add", "path": "/app/debug", "value": true}]"#,
    );
    r.ok(&with(
        &[
            "environment",
            "patch-properties",
            "--file",
            p(&patch),
            "--if-version",
            "2",
        ],
        &ENV,
    ));
    assert_eq!(
        show_env(&r),
        json!({"app": {"port": "80", "hosts": ["a"], "debug": true}, "opschain": {"env": {"X": "1"}}})
    );
    // Old versions stay readable.
    let v2: Value = serde_json::from_str(&r.ok(&with(
        &["environment", "show-properties", "--version", "2"],
        &ENV,
    )))
    .unwrap();
    assert_eq!(v2["app"].get("debug"), None);
    let history: Value = serde_json::from_str(&r.ok(&with(
        &["environment", "properties-history", "--output", "json"],
        &ENV,
    )))
    .unwrap();
    let versions: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(
        history[2]["written_by"]["by"],
        if r.remote() { "api" } else { "cli" }
    );
    // Project properties are separate from the environment's; stdin works as a file.
    let out = r.run_stdin(
        &[
            "project",
            "set-properties",
            "--project",
            "demo",
            "--file",
            "-",
        ],
        r#"{"p": 1}"#,
    );
    assert!(out.status.success());
    assert_eq!(
        r.ok(&["project", "show-properties", "--project", "demo"])
            .trim(),
        "{\n  \"p\": 1\n}"
    );
    let text = r.ok(&["project", "properties-history", "--project", "demo"]);
    assert!(
        text.lines().count() == 3 && text.starts_with("VERSION"),
        "{text}"
    );
}

fn errors_name_the_problem_and_change_nothing(r: Runner) {
    let r = setup(r);
    let good = r.file("good.json", r#"{"a": 1}"#);
    r.ok(&with(
        &["environment", "set-properties", "--file", p(&good)],
        &ENV,
    ));

    // Unknown project / environment.
    let err = r.fails(&["project", "show-properties", "--project", "nope"], 1);
    assert!(
        err.starts_with("error: project \"nope\" does not exist"),
        "{err}"
    );
    let err = r.fails(
        &[
            "environment",
            "show-properties",
            "--project",
            "demo",
            "--environment",
            "prod",
        ],
        1,
    );
    assert!(
        err.contains("environment \"prod\" does not exist in project \"demo\""),
        "{err}"
    );

    // Malformed JSON, with line and column.
    let bad = r.file("bad.json", "{\n  \"a\": 1,\n  oops\n}");
    let err = r.fails(
        &with(&["environment", "set-properties", "--file", p(&bad)], &ENV),
        1,
    );
    assert!(
        err.contains("bad.json, line 3, column 3: invalid JSON"),
        "{err}"
    );

    // A patch that does not apply: which operation, which path.
    let patch = r.file(
        "p.json",
        r#"[{"op":"add","path":"/b","value":2},{"op":"replace","path":"/missing/x","value":1}]"#,
    );
    let err = r.fails(
        &with(
            &["environment", "patch-properties", "--file", p(&patch)],
            &ENV,
        ),
        1,
    );
    assert!(
        err.contains("operation 1 (replace /missing/x) does not apply"),
        "{err}"
    );

    // A patch file that is JSON but not a patch.
    let err = r.fails(
        &with(
            &["environment", "patch-properties", "--file", p(&good)],
            &ENV,
        ),
        1,
    );
    assert!(err.contains("not an RFC 6902 patch"), "{err}");

    // Version conflict: expected vs current.
    let ok_patch = r.file("ok.json", r#"[{"op":"add","path":"/b","value":2}]"#);
    let err = r.fails(
        &with(
            &[
                "environment",
                "patch-properties",
                "--file",
                p(&ok_patch),
                "--if-version",
                "1",
            ],
            &ENV,
        ),
        1,
    );
    assert!(
        err.contains("expected version 1, but the current version is 2"),
        "{err}"
    );
    let err = r.fails(
        &with(
            &[
                "environment",
                "set-properties",
                "--file",
                p(&good),
                "--if-version",
                "5",
            ],
            &ENV,
        ),
        1,
    );
    assert!(
        err.contains("expected version 5, but the current version is 2"),
        "{err}"
    );

    // Invalid opschain section.
    let invalid = r.file(
        "inv.json",
        r#"{"opschain": {"files": {"/etc/x": {"content": "a", "format": "xml"}}}}"#,
    );
    let err = r.fails(
        &with(
            &["environment", "set-properties", "--file", p(&invalid)],
            &ENV,
        ),
        1,
    );
    assert!(
        err.contains("`opschain.files[\"/etc/x\"].format` is \"xml\""),
        "{err}"
    );

    // Missing file, duplicate project, bad code, usage error.
    let err = r.fails(
        &with(
            &[
                "environment",
                "set-properties",
                "--file",
                "/nonexistent.json",
            ],
            &ENV,
        ),
        1,
    );
    assert!(err.contains("failed to read /nonexistent.json"), "{err}");
    let err = r.fails(
        &["project", "create", "--code", "demo", "--name", "Again"],
        1,
    );
    assert!(err.contains("project \"demo\" already exists"), "{err}");
    let err = r.fails(
        &["project", "create", "--code", "Bad Code", "--name", "x"],
        1,
    );
    assert!(err.contains("invalid project code \"Bad Code\""), "{err}");
    r.fails(&["project", "frobnicate"], 2);
    r.fails(&["environment", "show-properties", "--project", "demo"], 2);

    // Nothing was lost: still version 2 with the good document.
    assert_eq!(show_env(&r), json!({"a": 1}));
    let history = r.ok(&with(&["environment", "properties-history"], &ENV));
    assert_eq!(history.lines().count(), 3, "{history}");
}

#[test]
fn secrets_stay_off_the_api() {
    if !support::docker_available() {
        return;
    }
    let r = Runner::with_server();
    let err = r.fails(&["secret", "set", "db", "PASSWORD=x"], 1);
    assert!(err.contains("secrets never travel over the API"), "{err}");
    let wrong = r
        .cmd(&["project", "list"])
        .env("RUNNER_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("bearer token is not valid"));
    let down = r
        .cmd(&["project", "list"])
        .env("RUNNER_SERVER", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr)
        .contains("cannot reach the runner server at http://127.0.0.1:1"));
}

#[test]
fn secrets_are_listed_by_key_never_by_value() {
    let r = Runner::new();
    r.ok(&["secret", "set", "db", "USER=admin", "PASSWORD=canary-3f9a"]);
    let env_file = r.file("s.env", "# comment\nexport TOKEN=canary-77\n");
    r.ok(&["secret", "set", "api", "--from-env-file", p(&env_file)]);
    let list = r.ok(&["secret", "list"]);
    assert!(list.contains("db\tPASSWORD,USER"), "{list}");
    assert!(
        list.contains("api\tTOKEN")
            && list.contains("opschain-build-env")
            && list.contains("opschain-runner-env")
    );
    assert!(!list.contains("canary"));
    let db = std::fs::read_to_string(r.home.path().join("runner.db")).unwrap_or_default();
    assert!(!db.contains("canary"));
    let err = r.fails(&["secret", "set", "db", "NOEQUALS"], 1);
    assert!(
        err.contains("invalid secret entry") && !err.contains("canary"),
        "{err}"
    );
    let err = r.fails(&["secret", "set", "db"], 1);
    assert!(err.contains("KEY=VALUE"), "{err}");
    r.ok(&["secret", "delete", "db"]);
    let err = r.fails(&["secret", "delete", "db"], 1);
    assert!(err.contains("secret \"db\" does not exist"), "{err}");
}

fn concurrent_patches_from_two_processes_lose_nothing(r: Runner) {
    let r = setup(r);
    let per_process = 50;
    std::thread::scope(|s| {
        for writer in ["a", "b"] {
            let r = &r;
            s.spawn(move || {
                for i in 0..per_process {
                    let patch = format!(r#"[{{"op":"add","path":"/{writer}{i}","value":{i}}}]"#);
                    let out = r.run_stdin(
                        &with(&["environment", "patch-properties", "--file", "-"], &ENV),
                        &patch,
                    );
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
    let doc = show_env(&r);
    assert_eq!(doc.as_object().unwrap().len(), 2 * per_process);
    for i in 0..per_process {
        assert_eq!(doc[format!("a{i}")], i);
        assert_eq!(doc[format!("b{i}")], i);
    }
    let history: Value = serde_json::from_str(&r.ok(&with(
        &["environment", "properties-history", "--output", "json"],
        &ENV,
    )))
    .unwrap();
    let versions: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=(2 * per_process as i64 + 1)).collect::<Vec<_>>()
    );
}

#[test]
fn a_cache_budget_that_is_not_a_size_is_refused_before_anything_runs() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "change",
            "create",
            "--project",
            "p",
            "--environment",
            "e",
            "--git-rev",
            "main",
            "--action",
            "a",
        ])
        .env("RUNNER_HOME", home.path())
        .env("RUNNER_CACHE_BUDGET", "lots")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("RUNNER_CACHE_BUDGET")
            && stderr.contains("lots")
            && stderr.contains("20GiB"),
        "{stderr}"
    );
}
