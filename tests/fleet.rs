//! Workers of a fleet (separate data directories, separate processes), each on a "host" of its own (`unshare --uts
//! --net`, its own host name, the store over its unix socket), sharing one PostgreSQL store: they run the queue
//! (`runner change create` against PostgreSQL only queues, see tests/follow.rs) and the steps of one change spread
//! over them; a worker killed mid-step loses its step by its lease's expiry on the store's clock (or has it run
//! again elsewhere, where the action opts in), the others carry on, and once the lost worker starts again nothing
//! of the killed change is left in Docker.

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

/// Containers, networks and volumes in Docker labelled `label` (`name=value`).
async fn left_in_docker(label: &str) -> usize {
    let docker = runner::executor::docker::connect().await.unwrap();
    let filters = Some(HashMap::from([(
        "label".to_owned(),
        vec![label.to_owned()],
    )]));
    let containers = docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: filters.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .len();
    let networks = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: filters.clone(),
        }))
        .await
        .unwrap()
        .len();
    let volumes = docker
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
            filters,
        }))
        .await
        .unwrap()
        .volumes
        .unwrap_or_default()
        .len();
    containers + networks + volumes
}

/// The `runner.store` label each worker's data directory puts on what it creates in Docker (only a runner of
/// that data directory reaps it).
async fn store_labels<'a>(url: &str, workers: impl IntoIterator<Item = &'a Worker>) -> Vec<String> {
    let mut labels = Vec::new();
    for worker in workers {
        let home = worker.home.as_ref().unwrap().path();
        let store = runner::store::Store::connect(home, Some(url))
            .await
            .unwrap();
        labels.push(format!("{}={}", runner::executor::LABEL_STORE, store.id()));
        store.close().await;
    }
    labels
}

/// Asserts that nothing carrying any of these `runner.store` labels is left in Docker.
async fn nothing_left_of(stores: &[String]) {
    for label in stores {
        assert_eq!(left_in_docker(label).await, 0, "left in Docker: {label}");
    }
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
    /// The host name it runs under (`None`: this machine's).
    host: Option<String>,
}

/// A failing test leaves no worker behind.
impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    /// A worker on a "host" of its own: its own UTS and network namespaces (`unshare --uts --net`) and host name,
    /// reaching PostgreSQL over its unix socket (`url` must be a socket URL) and Docker over its socket. Other
    /// workers cannot check its pid, so only its lease's expiry on the store's clock says it is gone.
    fn start_on_host(host: &str, url: &str) -> Worker {
        Worker::start_in(tempfile::tempdir().unwrap(), url, Some(host))
    }

    fn start_in(home: tempfile::TempDir, url: &str, host: Option<&str>) -> Worker {
        let log = home.path().join("worker.log");
        let runner = env!("CARGO_BIN_EXE_runner");
        let mut command = match host {
            None => {
                let mut c = Command::new(runner);
                c.args(["worker", "--parallel", "4"]);
                c
            }
            Some(host) => {
                let mut c = Command::new("unshare");
                c.args(["--uts", "--net", "sh", "-c"])
                    .arg(format!(
                        "hostname {host} && exec \"$0\" worker --parallel 4"
                    ))
                    .arg(runner);
                c
            }
        };
        let child = command
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
                !text.contains("unshare:"),
                "unshare was refused (the fleet tests run as root to give each worker a host of its own): {text}"
            );
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
            host: host.map(str::to_owned),
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
  "sleep": {"run": "echo sleeping && sleep 60"},
  "slow": {"run": "echo slow && sleep 8", "retry_on_worker_loss": true},
  "rerunnable": {"steps": ["noop", "slow", "noop"]},
  "gate": {"run": "test \"$(opschain-properties get --scope environment /go)\" = true"},
  "gated": {"steps": ["tick", "gate"]}
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
    let url = socket_database();
    let admin = fleet_project(&url);
    let workers: Vec<Worker> = ["w1", "w2", "w3"]
        .iter()
        .map(|h| Worker::start_on_host(h, &url))
        .collect();
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
    // Steps spread over the workers: every step ran on a worker of this test, and the steps of some change ran
    // on more than one of them (read from the store: each step records its worker).
    let known: std::collections::HashSet<&str> = workers.iter().map(|w| w.owner.as_str()).collect();
    let mut spread = 0;
    for change in &changes {
        assert!(
            change["owner"].is_null(),
            "a fleet change stays unowned: {change}"
        );
        let shown = json(
            admin.path(),
            &url,
            &["change", "show", change["id"].as_str().unwrap()],
        );
        let ran: std::collections::HashSet<&str> = shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["worker"].as_str())
            .collect();
        assert!(ran.is_subset(&known), "{ran:?} vs {known:?}");
        if ran.len() > 1 {
            spread += 1;
        }
    }
    assert!(
        spread > 0,
        "no change had its steps run on more than one worker"
    );
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

/// A database of the shared cluster, by its socket URL (for workers on hosts of their own).
fn socket_database() -> String {
    let cluster = support::postgres::shared();
    let tcp = cluster.database();
    let name = tcp.rsplit('/').next().unwrap().to_owned();
    cluster.socket_url(&name)
}

/// Waits until a step of `action` of `change` runs (its container up); returns that step as shown.
async fn running_step(
    admin: &std::path::Path,
    url: &str,
    change: &str,
    action: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let shown = json(admin, url, &["change", "show", change]);
        let step = shown["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["action"] == action && s["state"] == "running")
            .cloned();
        if let Some(step) = step {
            if containers_of(change).await > 0 {
                return step;
            }
        }
        assert!(Instant::now() < deadline, "the step never ran: {shown}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The host in a lost-worker reason (`worker W on host H was lost …`) and the reaping worker's (`… (seen by
/// worker W on host H)`).
fn hosts_in(reason: &str) -> (String, String) {
    let lost = reason
        .split(" was lost")
        .next()
        .and_then(|head| head.rsplit("on host ").next())
        .unwrap_or_default();
    let seen = reason
        .rsplit("(seen by worker ")
        .next()
        .and_then(|tail| tail.split(" on host ").nth(1))
        .and_then(|host| host.split(')').next())
        .unwrap_or_default();
    (lost.to_owned(), seen.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_loses_its_step_and_the_others_carry_on() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = socket_database();
    let admin = fleet_project(&url);
    let workers: Vec<Worker> = ["w1", "w2"]
        .iter()
        .map(|h| Worker::start_on_host(h, &url))
        .collect();
    let change = enqueue(admin.path(), &url, "env0", "sleep");
    let step = running_step(admin.path(), &url, &change, "sleep").await;
    let worker = step["worker"].as_str().unwrap().to_owned();
    let (mut lost, others): (Vec<Worker>, Vec<Worker>) =
        workers.into_iter().partition(|w| w.owner == worker);
    let mut lost = lost.pop().expect("a worker of this test ran it");
    let killed_at = Instant::now();
    lost.child.kill().unwrap();
    lost.child.wait().unwrap();
    let stores = store_labels(&url, std::iter::once(&lost).chain(&others)).await;

    // On another host nobody can check the lost worker's pid: its lease's expiry (the store's clock) tells. The
    // step fails naming the lost worker, and the change ends as its tree says.
    let expiry = runner::orchestrator::lease::LEASE_TTL + Duration::from_secs(15);
    let shown = loop {
        let shown = json(admin.path(), &url, &["change", "show", &change]);
        if shown["change"]["state"] != "running" {
            break shown;
        }
        assert!(
            killed_at.elapsed() < expiry,
            "the lost worker's step still runs after its lease expired: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(shown["change"]["state"], "error", "{shown}");
    let sleep = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "sleep")
        .unwrap()
        .clone();
    assert_eq!(sleep["state"], "error", "{sleep}");
    let reason = sleep["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&worker) && reason.contains("was lost"),
        "{reason}"
    );
    let (lost_host, reaper_host) = hosts_in(reason);
    assert!(["w1", "w2"].contains(&lost_host.as_str()), "{reason}");
    assert!(["w1", "w2"].contains(&reaper_host.as_str()), "{reason}");
    assert_ne!(
        lost_host, reaper_host,
        "the step was reaped from another host: {reason}"
    );
    assert_eq!(shown["change"]["reason"].as_str(), Some(reason));

    // The others carry on: the environment is free for the next change.
    let next = enqueue(admin.path(), &url, "env0", "sequential");
    let other = enqueue(admin.path(), &url, "env1", "parallel");
    let changes = wait_all_ended(admin.path(), &url, 3);
    for id in [&next, &other] {
        let c = changes.iter().find(|c| c["id"] == id.as_str()).unwrap();
        assert_eq!(c["state"], "success", "{c}");
    }

    // The lost worker comes back (on its host): nothing of its step is left in Docker, nothing left running.
    let back = Worker::start_in(lost.home.take().unwrap(), &url, Some(&lost_host));
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&change).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the killed change's container is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in wait_all_ended(admin.path(), &url, 3) {
        let shown = json(
            admin.path(),
            &url,
            &["change", "show", c["id"].as_str().unwrap()],
        );
        for s in shown["steps"].as_array().unwrap() {
            assert!(
                !matches!(s["state"].as_str(), Some("running" | "ready")),
                "left running: {s}"
            );
        }
    }
    back.stop();
    for worker in others {
        worker.stop();
    }
    nothing_left_of(&stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_opts_in_runs_again_on_another_worker_when_its_worker_is_lost() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = socket_database();
    let admin = fleet_project(&url);
    let workers: Vec<Worker> = ["w1", "w2"]
        .iter()
        .map(|h| Worker::start_on_host(h, &url))
        .collect();
    let change = enqueue(admin.path(), &url, "env0", "rerunnable");
    let step = running_step(admin.path(), &url, &change, "slow").await;
    let worker = step["worker"].as_str().unwrap().to_owned();
    let (mut lost, others): (Vec<Worker>, Vec<Worker>) =
        workers.into_iter().partition(|w| w.owner == worker);
    let mut lost = lost.pop().expect("a worker of this test ran it");
    lost.child.kill().unwrap();
    lost.child.wait().unwrap();

    let changes = wait_all_ended(admin.path(), &url, 1);
    assert_eq!(changes[0]["state"], "success", "{}", changes[0]);
    let shown = json(admin.path(), &url, &["change", "show", &change]);
    let slow = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(slow["state"], "success", "{slow}");
    assert_eq!(
        slow["worker"].as_str(),
        Some(others[0].owner.as_str()),
        "it ran again on the other worker"
    );
    // The re-queue is on the record, naming the lost worker.
    let logs = on_host(admin.path(), &url, &["change", "show-logs", &change]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains(&worker) && text.contains("runs again"),
        "{text}"
    );

    // What the lost run left in Docker (its container, maybe never sent its envelope) carries the lost worker's
    // data directory on its `runner.store` label, and only a runner of that data directory reaps it (the rule:
    // gone at the next start after a crash): the lost worker comes back on its host and removes it. Then, every
    // worker stopped, nothing of theirs is left in Docker.
    let stores = store_labels(&url, [&lost, &others[0]]).await;
    let host = lost
        .host
        .clone()
        .expect("the lost worker ran on a host of its own");
    let back = Worker::start_in(lost.home.take().unwrap(), &url, Some(&host));
    drop(lost);
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers_of(&change).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the lost worker came back and the lost run's container is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    back.stop();
    for worker in others {
        worker.stop();
    }
    nothing_left_of(&stores).await;
}

#[test]
fn a_retry_against_postgresql_goes_back_to_the_fleet_and_keeps_the_steps_that_succeeded() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    support::base_image();
    let url = socket_database();
    let admin = fleet_project(&url);
    let worker = Worker::start_on_host("w1", &url);
    let change = enqueue(admin.path(), &url, "env0", "gated");
    let ended = wait_all_ended(admin.path(), &url, 1);
    assert_eq!(
        ended[0]["state"], "error",
        "the gate is closed: {}",
        ended[0]
    );

    // The gate opens; `count` keeps what the first attempt's `tick` wrote.
    let open = admin.path().join("open.json");
    std::fs::write(&open, r#"{"count": 1, "go": true}"#).unwrap();
    let props = on_host(
        admin.path(),
        &url,
        &[
            "environment",
            "set-properties",
            "--project",
            "fleet",
            "--environment",
            "env0",
            "--file",
            open.to_str().unwrap(),
        ],
    );
    assert!(
        props.status.success(),
        "{}",
        String::from_utf8_lossy(&props.stderr)
    );

    // This process has no Docker of its own to run it with: the retry queues, a worker runs it, the CLI follows.
    let retried = on_host(admin.path(), &url, &["change", "retry", &change]);
    let stderr = String::from_utf8_lossy(&retried.stderr);
    assert!(retried.status.success(), "{stderr}");
    assert!(
        stderr.contains("queued again for the fleet's workers (attempt 2)"),
        "{stderr}"
    );
    let shown = json(admin.path(), &url, &["change", "show", &change]);
    assert_eq!(shown["change"]["state"], "success", "{shown}");
    let steps = shown["steps"].as_array().unwrap();
    let step = |action: &str| {
        steps
            .iter()
            .find(|s| s["action"] == action)
            .unwrap()
            .clone()
    };
    assert_eq!(
        step("gate")["worker"].as_str(),
        Some(worker.owner.as_str()),
        "a worker ran the retry: {shown}"
    );
    assert_eq!(
        step("tick")["attempt"],
        1,
        "tick succeeded in attempt 1 and was not run again: {shown}"
    );
    assert_eq!(step("gate")["attempt"], 2, "{shown}");
    let props = json(
        admin.path(),
        &url,
        &[
            "environment",
            "show-properties",
            "--project",
            "fleet",
            "--environment",
            "env0",
        ],
    );
    assert_eq!(props["count"], 1, "tick's patch landed once: {props}");
    worker.stop();
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
