//! Following a change whichever worker runs it: `runner change create` against PostgreSQL queues the change and
//! follows it in the store; `show-logs --follow` follows it too. Both are woken by the store's notifications
//! (LISTEN/NOTIFY), not by polling: the followers here poll once an hour, so a follower that sees a change to its
//! end within the test saw it by notification.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A follower's fallback poll: longer than any test here may take.
const NEVER: &str = "1h";
/// How long a test waits for a process before calling it hung (a guard, not a speed goal).
const HUNG: Duration = Duration::from_secs(300);

fn runner(home: &std::path::Path, url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.args(args)
        .env("RUNNER_HOME", home)
        .env("RUNNER_DATABASE_URL", url)
        .env("RUNNER_FOLLOW_FALLBACK", NEVER)
        .env("RUNNER_STOP_GRACE", "2s");
    cmd
}

fn ok(home: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = runner(home, url, args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A data directory (the admin's) holding a project whose `hello` action prints a line, with environment `dev`,
/// in the store `url`.
fn project(url: &str) -> tempfile::TempDir {
    let admin = tempfile::tempdir().unwrap();
    let repo = admin.path().join("repo");
    std::fs::create_dir_all(repo.join(".opschain")).unwrap();
    std::fs::write(
        repo.join(".opschain/actions.json"),
        r#"{"actions": {"hello": {"run": "echo hello from the fleet"}}}"#,
    )
    .unwrap();
    support::git(&repo, &["init", "-q", "-b", "main"]);
    support::git(&repo, &["add", "-A"]);
    support::git(&repo, &["commit", "-q", "-m", "follow project"]);
    let home = admin.path();
    ok(
        home,
        url,
        &[
            "project",
            "create",
            "--code",
            "demo",
            "--name",
            "Demo",
            "--git-remote",
            repo.to_str().unwrap(),
        ],
    );
    ok(
        home,
        url,
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
    admin
}

const CREATE: &[&str] = &[
    "change",
    "create",
    "--project",
    "demo",
    "--environment",
    "dev",
    "--git-rev",
    "main",
    "--action",
    "hello",
];

/// A `runner worker` in a data directory of its own: another host of the fleet. Killed if a test fails.
struct Worker {
    _home: tempfile::TempDir,
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(url: &str) -> Worker {
        let home = tempfile::tempdir().unwrap();
        let child = runner(home.path(), url, &["worker"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Worker { _home: home, child }
    }
}

/// Waits for `child` to end; kills it and fails if it takes longer than [`HUNG`].
fn finish(mut child: Child, what: &str) -> std::process::Output {
    let deadline = Instant::now() + HUNG;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} never saw the change end (its fallback poll is {NEVER}: no notification woke it): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// How many connections LISTEN on the store `url` (a follower listens before it first reads).
async fn listeners(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_create_on_postgres_queues_and_both_followers_are_woken_by_the_worker_of_another_process(
) {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let admin = project(&url);
    // No worker yet: the change waits in the queue while its followers start.
    let create = runner(admin.path(), &url, CREATE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + HUNG;
    let id = loop {
        let list: serde_json::Value = serde_json::from_str(&ok(
            admin.path(),
            &url,
            &["change", "list", "--output", "json"],
        ))
        .unwrap();
        if let Some(id) = list.as_array().unwrap().first().map(|c| c["id"].clone()) {
            break id.as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "change create queued nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let shown: serde_json::Value = serde_json::from_str(&ok(
        admin.path(),
        &url,
        &["change", "show", &id, "--output", "json"],
    ))
    .unwrap();
    assert_eq!(shown["change"]["state"], "pending", "{shown}");
    assert_eq!(
        shown["change"]["owner"],
        serde_json::Value::Null,
        "change create on PostgreSQL runs nothing itself: {shown}"
    );
    let logs = runner(
        admin.path(),
        &url,
        &["change", "show-logs", &id, "--follow"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Both followers listen (and so have read the store once) before anything runs.
    while listeners(&url).await < 2 {
        assert!(Instant::now() < deadline, "the followers never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let worker = Worker::start(&url);
    let created = finish(create, "change create");
    let followed = finish(logs, "show-logs --follow");
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{stderr}");
    assert!(
        stderr.contains("queued for the fleet's workers"),
        "{stderr}"
    );
    let out = String::from_utf8_lossy(&created.stdout).into_owned() + &stderr;
    assert!(out.contains("hello from the fleet"), "{out}");
    assert!(
        followed.status.success(),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&followed.stdout).contains("hello from the fleet"),
        "{}",
        String::from_utf8_lossy(&followed.stdout)
    );
    // The worker, another process, ran it.
    let shown: serde_json::Value = serde_json::from_str(&ok(
        admin.path(),
        &url,
        &["change", "show", &id, "--output", "json"],
    ))
    .unwrap();
    assert_eq!(shown["change"]["state"], "success", "{shown}");
    // A fleet change stays unowned; its steps record the worker that ran them.
    assert!(shown["change"]["owner"].is_null(), "{shown}");
    assert!(
        shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["worker"].is_string()),
        "{shown}"
    );
    drop(worker);
}

/// A `runner serve` that runs nothing itself: its WatchChange follows what a worker in another process stores.
struct Server {
    _home: tempfile::TempDir,
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

impl Server {
    /// gRPC on `address`, and the web view on `web` if given.
    fn start(url: &str, web: Option<&str>) -> Server {
        let home = tempfile::tempdir().unwrap();
        let listen = free_address();
        let mut args = vec!["serve", "--no-worker", "--listen", &listen];
        if let Some(web) = web {
            args.extend(["--http", web]);
        }
        let child = runner(home.path(), url, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Server {
            _home: home,
            child,
            address: format!("http://{listen}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_change_on_a_server_is_woken_by_the_worker_of_another_process() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let admin = project(&url);
    let mut args = CREATE.to_vec();
    args.push("--background");
    let id = ok(admin.path(), &url, &args).trim().to_owned();
    // The server polls once an hour (RUNNER_FOLLOW_FALLBACK): only a notification can move its watch along.
    let server = Server::start(&url, None);
    let deadline = Instant::now() + HUNG;
    let remote = |args: &[&str]| {
        let mut all = vec!["--server", server.address.as_str()];
        all.extend(args);
        runner(admin.path(), &url, &all)
    };
    while !remote(&["change", "show", &id])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch = remote(&["change", "show-logs", &id, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The server's watch listens (and has read the store once) before anything runs.
    while listeners(&url).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the server's watch never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = Worker::start(&url);
    let watched = finish(watch, "WatchChange (show-logs --follow --server)");
    let stdout = String::from_utf8_lossy(&watched.stdout);
    assert!(
        watched.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(stdout.contains("hello from the fleet"), "{stdout}");
    drop(worker);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_views_live_stream_is_woken_by_the_worker_of_another_process() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let admin = project(&url);
    let mut args = CREATE.to_vec();
    args.push("--background");
    let id = ok(admin.path(), &url, &args).trim().to_owned();
    let web = free_address();
    // The server polls once an hour (RUNNER_FOLLOW_FALLBACK): only a notification can move its stream along.
    let server = Server::start(&url, Some(&web));
    let deadline = Instant::now() + HUNG;
    let mut stream = loop {
        if let Ok(stream) = std::net::TcpStream::connect(&web) {
            break stream;
        }
        assert!(Instant::now() < deadline, "the web view never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    std::io::Write::write_all(
        &mut stream,
        format!(
            "GET /changes/{id}/events HTTP/1.1\r\nHost: {web}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    // Reads the stream until its `end` event (or until it closes).
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            seen += &line;
            seen.push('\n');
            if line == "event: end" {
                break;
            }
        }
        let _ = read_tx.send(seen);
    });
    while listeners(&url).await < 1 {
        assert!(Instant::now() < deadline, "the live stream never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = Worker::start(&url);
    let seen = read_rx.recv_timeout(HUNG).unwrap_or_else(|_| {
        panic!("the live stream never saw the change end (its fallback poll is {NEVER}: no notification woke it)")
    });
    assert!(seen.contains("event: end"), "{seen}");
    // Updates came as the worker stored the change's steps, before the end.
    assert!(seen.matches("event: update").count() >= 2, "{seen}");
    let shown: serde_json::Value = serde_json::from_str(&ok(
        admin.path(),
        &url,
        &["change", "show", &id, "--output", "json"],
    ))
    .unwrap();
    assert_eq!(shown["change"]["state"], "success", "{shown}");
    drop(worker);
    drop(server);
}

#[test]
fn a_queued_change_no_worker_can_take_is_said_once_and_a_signal_cancels_it() {
    if !support::postgres::postgres_available() {
        return;
    }
    let url = support::postgres::shared().database();
    let admin = project(&url);
    let mut create = runner(admin.path(), &url, CREATE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(create.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("no worker serves this store") {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "change create ended without saying no worker takes its change: {seen}"
        );
        seen += &line;
    }
    // SAFETY: signals a child process this test started and still holds.
    unsafe { libc::kill(create.id() as libc::pid_t, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = create.wait().unwrap();
    let seen = seen + &rest;
    assert!(
        !status.success(),
        "a cancelled change is no success: {seen}"
    );
    assert_eq!(
        seen.matches("no worker serves this store").count(),
        1,
        "{seen}"
    );
    assert!(seen.contains("runner worker"), "{seen}");
    assert!(seen.contains("cancelling change"), "{seen}");
    assert!(seen.contains("cancelled"), "{seen}");
}

#[test]
fn enqueue_with_server_is_refused_before_anything_is_contacted() {
    let home = tempfile::tempdir().unwrap();
    let mut args = vec!["--server", "http://127.0.0.1:9"];
    args.extend(CREATE);
    args.push("--enqueue");
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(&args)
        .env("RUNNER_HOME", home.path())
        .env_remove("RUNNER_DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--enqueue does not apply with --server"),
        "{stderr}"
    );
    assert!(stderr.contains("--database"), "{stderr}");
}

#[test]
fn a_bad_follow_fallback_is_refused_with_what_to_write() {
    let home = tempfile::tempdir().unwrap();
    for (value, says) in [
        ("soon", "invalid duration"),
        ("1ms", "at least 10ms"),
        ("0s", "too short"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["change", "list"])
            .env("RUNNER_HOME", home.path())
            .env_remove("RUNNER_DATABASE_URL")
            .env("RUNNER_FOLLOW_FALLBACK", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: {stderr}");
        assert!(stderr.contains(says), "{value}: {stderr}");
        assert!(stderr.contains("follow-fallback"), "{value}: {stderr}");
    }
    // The flag is the variable's twin, and a good value is taken.
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["--follow-fallback", "500ms", "change", "list"])
        .env("RUNNER_HOME", home.path())
        .env_remove("RUNNER_DATABASE_URL")
        .env_remove("RUNNER_FOLLOW_FALLBACK")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_wakeups_prints_each_wake_up_beside_the_poll_yardstick() {
    if !support::postgres::postgres_available() {
        return;
    }
    let url = support::postgres::shared().database();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["bench", "wakeups", "--trials", "3", "--postgres", &url])
        .env("RUNNER_HOME", home.path())
        .env_remove("RUNNER_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "SQLite, in-process signal",
        "SQLite, poll every 200 ms",
        "PostgreSQL, NOTIFY from another connection pool",
        "PostgreSQL, poll every 200 ms",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no {row:?} row: {stdout}"));
        // Every wake-up came: none lost (the last column).
        assert!(line.ends_with(" 0"), "{line}");
    }
    assert!(stdout.contains("sooner than the 200 ms poll"), "{stdout}");
}
