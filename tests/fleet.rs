//! Workers of a fleet (separate data directories, separate processes) sharing one PostgreSQL store: they run the
//! queue (`runner change create` against PostgreSQL only queues, see tests/follow.rs); one is killed with SIGKILL
//! while its step runs; the others see the change end with the dead worker named and run the next changes on the
//! same environment, and once the lost worker starts again nothing of the killed change is left in Docker.

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

async fn containers_of(change: &str) -> usize {
    let docker = runner::executor::docker::connect().await.unwrap();
    docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![format!("runner.change={change}")],
            )])),
            ..Default::default()
        }))
        .await
        .unwrap()
        .len()
}

fn on_host(home: &std::path::Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .env("RUNNER_HOME", home)
        .env("RUNNER_DATABASE_URL", url)
        .env("RUNNER_STOP_GRACE", "2s")
        .output()
        .unwrap()
}

fn json(home: &std::path::Path, url: &str, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = on_host(home, url, &args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `runner worker` process with its own data directory, on the shared store; its stderr goes to a file, from
/// which its owner id is read.
struct Worker {
    home: Option<tempfile::TempDir>,
    child: std::process::Child,
    owner: String,
}

/// A failing test leaves no worker behind.
impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(url: &str) -> Worker {
        let home = tempfile::tempdir().unwrap();
        Worker::start_in(home, url)
    }

    fn start_in(home: tempfile::TempDir, url: &str) -> Worker {
        let log = home.path().join("worker.log");
        let child = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["worker", "--parallel", "4"])
            .env("RUNNER_HOME", home.path())
            .env("RUNNER_DATABASE_URL", url)
            .env("RUNNER_STOP_GRACE", "2s")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let owner = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(owner) = text
                .lines()
                .find_map(|l| l.strip_prefix("worker ")?.split(' ').next())
            {
                break owner.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Worker {
            home: Some(home),
            child,
            owner,
        }
    }

    /// SIGTERM, and waits for it to end (it ends its changes and gives up its lease first).
    fn stop(mut self) -> tempfile::TempDir {
        // SAFETY: signals a child process this test started and still holds.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the worker ended {status}");
        self.home.take().unwrap()
    }
}

/// A project whose every change bumps its environment's `/count` once (a lost update shows as a count short of
/// the changes run), in a sequential or a parallel tree of trivial steps.
fn fleet_project(url: &str) -> tempfile::TempDir {
    let admin = tempfile::tempdir().unwrap();
    let repo = admin.path().join("repo");
    std::fs::create_dir_all(repo.join(".opschain")).unwrap();
    std::fs::write(
        repo.join(".opschain/actions.json"),
        r#"{"actions": {
  "tick": {"run": "n=$(opschain-properties get --scope environment /count) && opschain-properties set --scope environment /count \"$((n + 1))\""},
  "noop": {"run": "true"},
  "both": {"steps": ["noop", "noop"], "run_as": "parallel"},
  "sequential": {"steps": ["noop", "tick", "noop"]},
  "parallel": {"steps": ["tick", "both"], "run_as": "parallel"},
  "sleep": {"run": "echo sleeping && sleep 60"}
}}"#,
    )
    .unwrap();
    support::git(&repo, &["init", "-q", "-b", "main"]);
    support::git(&repo, &["add", "-A"]);
    support::git(&repo, &["commit", "-q", "-m", "fleet project"]);
    let ok = |args: &[&str]| {
        let out = on_host(admin.path(), url, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&[
        "project",
        "create",
        "--code",
        "fleet",
        "--name",
        "Fleet",
        "--git-remote",
        repo.to_str().unwrap(),
    ]);
    let zero = admin.path().join("zero.json");
    std::fs::write(&zero, r#"{"count": 0}"#).unwrap();
    for e in 0..10 {
        let env = format!("env{e}");
        ok(&[
            "environment",
            "create",
            "--project",
            "fleet",
            "--code",
            &env,
            "--name",
            &env,
        ]);
        ok(&[
            "environment",
            "set-properties",
            "--project",
            "fleet",
            "--environment",
            &env,
            "--file",
            zero.to_str().unwrap(),
        ]);
    }
    admin
}

fn enqueue(admin: &std::path::Path, url: &str, env: &str, action: &str) -> String {
    let out = on_host(
        admin,
        url,
        &[
            "change",
            "create",
            "--project",
            "fleet",
            "--environment",
            env,
            "--git-rev",
            "main",
            "--action",
            action,
            "--enqueue",
            "--background",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_all_ended(admin: &std::path::Path, url: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let changes = json(admin, url, &["change", "list"]);
        let changes = changes.as_array().unwrap().clone();
        let ended = changes
            .iter()
            .filter(|c| matches!(c["state"].as_str(), Some("success" | "error" | "cancelled")))
            .count();
        if changes.len() == n && ended == n {
            return changes;
        }
        assert!(
            Instant::now() < deadline,
            "{ended} of {n} changes ended: {changes:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn three_workers_run_thirty_queued_changes_one_per_environment_at_a_time() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let admin = fleet_project(&url);
    let workers: Vec<Worker> = (0..3).map(|_| Worker::start(&url)).collect();
    let mut ids = Vec::new();
    for i in 0..30 {
        let action = if i % 2 == 0 { "sequential" } else { "parallel" };
        ids.push(enqueue(
            admin.path(),
            &url,
            &format!("env{}", i % 10),
            action,
        ));
    }
    let changes = wait_all_ended(admin.path(), &url, 30);
    for change in &changes {
        assert_eq!(change["state"], "success", "{change}");
    }
    // Every worker's changes are its own: more than one worker ran some.
    let owners: std::collections::HashSet<&str> =
        changes.iter().filter_map(|c| c["owner"].as_str()).collect();
    let known: std::collections::HashSet<&str> = workers.iter().map(|w| w.owner.as_str()).collect();
    assert!(owners.is_subset(&known), "{owners:?} vs {known:?}");
    assert!(owners.len() > 1, "one worker ran everything: {owners:?}");
    // Never two running changes on one environment: by the store's history, each change of an environment
    // started after the one before it ended, in creation order.
    for e in 0..10 {
        let env = format!("env{e}");
        let mut on_env: Vec<&serde_json::Value> =
            changes.iter().filter(|c| c["environment"] == env).collect();
        assert_eq!(on_env.len(), 3);
        on_env.sort_by_key(|c| c["created_at"].as_str().unwrap().to_owned());
        for pair in on_env.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            assert!(
                after["started_at"].as_str().unwrap() >= before["finished_at"].as_str().unwrap(),
                "two changes ran at once on {env}: {before} / {after}"
            );
        }
        // No property update lost: three changes, three ticks.
        let props = json(
            admin.path(),
            &url,
            &[
                "environment",
                "show-properties",
                "--project",
                "fleet",
                "--environment",
                &env,
            ],
        );
        assert_eq!(props["count"], 3, "{env}: {props}");
    }
    for worker in workers {
        worker.stop();
    }
    assert_eq!(ids.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_loses_its_change_and_the_others_carry_on() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let admin = fleet_project(&url);
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start(&url)).collect();
    let change = enqueue(admin.path(), &url, "env0", "sleep");
    let deadline = Instant::now() + Duration::from_secs(120);
    let owner = loop {
        let shown = json(admin.path(), &url, &["change", "show", &change]);
        let running = shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "running");
        if running && containers_of(&change).await > 0 {
            break shown["change"]["owner"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the step never ran: {shown}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (mut lost, others): (Vec<Worker>, Vec<Worker>) =
        workers.into_iter().partition(|w| w.owner == owner);
    let mut lost = lost.pop().expect("a worker of this test ran it");
    let killed_at = Instant::now();
    lost.child.kill().unwrap();
    lost.child.wait().unwrap();

    // The change ends, the lost worker named, within the lease's expiry.
    let shown = loop {
        let shown = json(admin.path(), &url, &["change", "show", &change]);
        if shown["change"]["state"] != "running" {
            break shown;
        }
        assert!(
            killed_at.elapsed() < runner::orchestrator::lease::LEASE_TTL,
            "the lost worker's change still runs: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(shown["change"]["state"], "error", "{shown}");
    let reason = shown["change"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&owner) && reason.contains("died"),
        "{reason}"
    );

    // The others carry on: the environment is free for the next change.
    let next = enqueue(admin.path(), &url, "env0", "sequential");
    let other = enqueue(admin.path(), &url, "env1", "parallel");
    let changes = wait_all_ended(admin.path(), &url, 3);
    for id in [&next, &other] {
        let c = changes.iter().find(|c| c["id"] == id.as_str()).unwrap();
        assert_eq!(c["state"], "success", "{c}");
        assert_ne!(c["owner"], owner.as_str());
    }

    // The lost worker comes back: nothing of its change is left in Docker.
    let back = Worker::start_in(lost.home.take().unwrap(), &url);
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&change).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the killed change's container is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    back.stop();
    for worker in others {
        worker.stop();
    }
}

#[test]
fn a_queued_change_waits_for_a_worker_and_a_cancel_ends_it() {
    if !support::docker_available() {
        return;
    }
    // SQLite: the queue works in one data directory too.
    let demo = support::Demo::new();
    let id = demo
        .ok(&support::create_args(
            "dev",
            "noop",
            &["--enqueue", "--background"],
        ))
        .trim()
        .to_owned();
    let shown = demo.json(&["change", "show", &id]);
    assert_eq!(shown["change"]["state"], "pending", "{shown}");
    assert_eq!(shown["change"]["owner"], serde_json::Value::Null, "{shown}");
    // Nobody runs it; a cancel ends it at once.
    demo.ok(&["change", "cancel", &id]);
    let shown = demo.json(&["change", "show", &id]);
    assert_eq!(shown["change"]["state"], "cancelled", "{shown}");
    assert!(
        shown["change"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("waited for a worker"),
        "{shown}"
    );
}

#[test]
fn bench_fleet_runs_one_sqlite_worker_beside_one_to_three_postgres_workers() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = support::postgres::shared().database();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "bench",
            "fleet",
            "--changes",
            "2",
            "--parallel",
            "1",
            "--postgres",
            &url,
        ])
        .env("RUNNER_HOME", home.path())
        .env_remove("RUNNER_DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for label in [
        "SQLite, one worker",
        "PostgreSQL, 1 worker(s)",
        "PostgreSQL, 2 worker(s)",
        "PostgreSQL, 3 worker(s)",
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} missing: {text}"));
        // Every configuration ran its changes: a rate, and a ratio against the SQLite row of the same run.
        assert!(row.trim_end().ends_with('x'), "{row}");
    }
}

#[test]
fn a_worker_refuses_bad_settings_and_a_missing_docker_clearly() {
    let home = tempfile::tempdir().unwrap();
    let worker = |args: &[&str], docker: &str| {
        Command::new(env!("CARGO_BIN_EXE_runner"))
            .arg("worker")
            .args(args)
            .env("RUNNER_HOME", home.path())
            .env("DOCKER_HOST", docker)
            .env_remove("RUNNER_DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = worker(&["--parallel", "0"], "unix:///var/run/docker.sock");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--parallel") && err.contains("1..=256"),
        "{err}"
    );
    // No Docker: it says so and ends, rather than taking changes it cannot run.
    let socket = home.path().join("no-docker.sock");
    let out = worker(&[], &format!("unix://{}", socket.display()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Docker daemon is unreachable"), "{err}");
}
