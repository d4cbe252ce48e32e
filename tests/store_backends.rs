//! Choosing the store from the command line: `--database postgres://…` / `RUNNER_DATABASE_URL` puts two data
//! directories (two hosts) on one PostgreSQL store; a URL the runner cannot use is a clear error that never shows
//! the password.

mod support;

use std::process::{Command, Output};

fn runner(home: &std::path::Path, database: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.args(args)
        .env("RUNNER_HOME", home)
        .env_remove("RUNNER_DATABASE_URL")
        .env_remove("RUNNER_SERVER");
    if let Some(url) = database {
        cmd.env("RUNNER_DATABASE_URL", url);
    }
    cmd.output().unwrap()
}

fn ok(home: &std::path::Path, database: Option<&str>, args: &[&str]) -> String {
    let out = runner(home, database, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn two_data_directories_share_one_postgres_store() {
    if !support::postgres::postgres_available() {
        return;
    }
    let url = support::postgres::shared().database();
    let (host_a, host_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ok(
        host_a.path(),
        Some(&url),
        &["project", "create", "--code", "demo", "--name", "Demo"],
    );
    ok(
        host_a.path(),
        Some(&url),
        &[
            "environment",
            "create",
            "--project",
            "demo",
            "--code",
            "dev",
            "--name",
            "Dev",
        ],
    );
    // The flag works as the variable does.
    let patch = host_b.path().join("patch.json");
    std::fs::write(&patch, r#"[{"op":"add","path":"/from","value":"host-b"}]"#).unwrap();
    ok(
        host_b.path(),
        None,
        &[
            "--database",
            &url,
            "environment",
            "patch-properties",
            "--project",
            "demo",
            "--environment",
            "dev",
            "--file",
            patch.to_str().unwrap(),
        ],
    );
    let props = ok(
        host_a.path(),
        Some(&url),
        &[
            "environment",
            "show-properties",
            "--project",
            "demo",
            "--environment",
            "dev",
        ],
    );
    let props: serde_json::Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props, serde_json::json!({"from": "host-b"}));
    let list = ok(
        host_b.path(),
        Some(&url),
        &["project", "list", "--output", "json"],
    );
    assert!(list.contains("\"demo\""), "{list}");
    // Neither data directory grew a SQLite store of its own.
    assert!(!host_a.path().join("runner.db").exists());
    assert!(!host_b.path().join("runner.db").exists());
    // And the SQLite default of a data directory knows nothing of them.
    let local = ok(
        host_a.path(),
        None,
        &["project", "list", "--output", "json"],
    );
    assert!(!local.contains("demo"), "{local}");
}

#[test]
fn an_unknown_store_url_is_refused_with_what_to_use() {
    let home = tempfile::tempdir().unwrap();
    let out = runner(
        home.path(),
        Some("mysql://root:hunter2@db/runner"),
        &["project", "list"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://USER"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

#[test]
fn an_unreachable_postgres_store_names_it_without_the_password() {
    let home = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://runner:hunter2@127.0.0.1:{port}/runner");
    let out = runner(home.path(), Some(&url), &["project", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("postgres://runner:***@127.0.0.1:{port}/runner")),
        "{err}"
    );
    assert!(err.contains("check that the server runs"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

#[test]
fn bench_store_compares_sqlite_with_one_to_three_postgres_writers() {
    if !support::postgres::postgres_available() {
        return;
    }
    let url = support::postgres::shared().database();
    let home = tempfile::tempdir().unwrap();
    let out = ok(
        home.path(),
        None,
        &[
            "bench",
            "store",
            "--steps",
            "6",
            "--change-steps",
            "3",
            "--rounds",
            "1",
            "--postgres",
            &url,
        ],
    );
    for label in [
        "SQLite, one process",
        "PostgreSQL, 1 worker(s)",
        "PostgreSQL, 2 worker(s)",
        "PostgreSQL, 3 worker(s)",
        "a 3-step sequential change",
        "stmts",
        "one durable commit on this PostgreSQL now",
    ] {
        assert!(out.contains(label), "{out}");
    }
    // The goal is judged for every PostgreSQL configuration, from the figures printed beside it.
    for workers in 1..=3 {
        let line = out
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "goal <= 10 ms of store overhead per step on PostgreSQL, {workers} worker(s)"
                ))
            })
            .unwrap_or_else(|| panic!("no goal line for {workers} worker(s): {out}"));
        let ms: f64 = line
            .rsplit_once(": ")
            .and_then(|(head, _)| head.rsplit_once(": "))
            .and_then(|(_, ms)| ms.strip_suffix(" ms"))
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no figure in {line:?}"));
        assert_eq!(line.ends_with(": met"), ms <= 10.0, "{line}");
    }
}
