//! End to end on the real daemon: the `runner` binary runs real steps in real containers.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::Demo;

async fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

/// Containers (running or not) carrying `label=value`.
async fn labelled(label: &str, value: &str) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    docker()
        .await
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
}

fn steps(demo: &Demo, id: &str) -> Vec<(String, String)> {
    let shown = demo.json(&["change", "show", id]);
    shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["action"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn demo_change_succeeds_and_leaves_the_expected_properties() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    demo.ok(&[
        "secret",
        "set",
        "opschain-build-env",
        "BUILD_TOKEN=build-canary-1f3e",
    ]);
    let (ok, stdout, stderr) = demo.change("dev", "deploy");
    assert!(ok, "{stdout}\n{stderr}");
    let sha = support::git(&demo.repo, &["rev-parse", "HEAD"]);
    // The custom Dockerfile ran with the build args and the build secret; the step saw the repository's .git.
    assert!(
        stdout.contains(&format!("built from {sha} (main) by runner")),
        "{stdout}"
    );
    assert!(stdout.contains("build secrets: present"), "{stdout}");
    assert!(
        stdout.contains(&format!("building commit {sha}")),
        "{stdout}"
    );
    // opschain.env from repository and environment properties, opschain.files from the environment's.
    assert!(
        stdout.contains("mode=development name=demo-app"),
        "{stdout}"
    );
    assert!(stdout.contains("listen=8080"), "{stdout}");
    assert!(!stdout.contains("build-canary-1f3e"));

    let env: Value = serde_json::from_str(&demo.ok(&[
        "environment",
        "show-properties",
        "--project",
        "demo",
        "--environment",
        "dev",
    ]))
    .unwrap();
    let mut expected: Value = serde_json::from_str(
        &std::fs::read_to_string(
            support::workspace_root().join("fixtures/demo-properties/dev.json"),
        )
        .unwrap(),
    )
    .unwrap();
    expected["release"] = json!({"version": "1.0.0"});
    assert_eq!(env, expected);
    let project: Value =
        serde_json::from_str(&demo.ok(&["project", "show-properties", "--project", "demo"]))
            .unwrap();
    assert_eq!(
        project,
        json!({"app": {"owner": "platform-team"}, "last_release": "dev"})
    );

    let id = demo.last_change();
    let all: Vec<String> = steps(&demo, &id)
        .into_iter()
        .map(|(a, s)| format!("{a}:{s}"))
        .collect();
    assert_eq!(
        all,
        [
            "deploy:success",
            "build:success",
            "configure:success",
            "checks:success",
            "release:success",
            "check_disk:success",
            "check_network:success"
        ]
    );
    // One image for the change's steps: the first step built it, every later one reused it.
    let shown = demo.json(&["change", "show", &id]);
    let images: Vec<(String, bool)> = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["image_id"].is_null())
        .map(|s| {
            (
                s["image_id"].as_str().unwrap().to_owned(),
                s["image_cached"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(images.len(), 5);
    assert!(images.iter().all(|(i, _)| *i == images[0].0));
    assert!(images[1..].iter().all(|(_, cached)| *cached));
    // The step records what it used.
    let release = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "release")
        .unwrap();
    let step = demo.json(&["step", "show", release["id"].as_str().unwrap()]);
    assert_eq!(step["properties"]["app"]["name"], "demo-app");
    assert_eq!(step["environment_version"], 2);
    assert!(
        labelled("runner.change", &id).await_blocking().is_empty(),
        "step containers are discarded"
    );
}

/// Lets the sync tests call the async container listing.
trait Blocking<T> {
    fn await_blocking(self) -> T;
}
impl<F: std::future::Future> Blocking<F::Output> for F {
    fn await_blocking(self) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(self)
    }
}

#[test]
fn sequential_stops_at_the_first_failure_and_parallel_lets_siblings_finish() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "sequence_with_failure");
    assert!(!ok);
    assert!(
        stderr.contains("error: change") && stderr.contains("step fail exited with code 3"),
        "{stderr}"
    );
    assert!(
        stdout.contains("about to fail"),
        "the step's stderr is in the log: {stdout}"
    );
    let sequential = steps(&demo, &demo.last_change());
    assert_eq!(
        sequential,
        [
            ("sequence_with_failure".into(), "error".into()),
            ("check_disk".into(), "success".into()),
            ("fail".into(), "error".into()),
            ("check_network".into(), "aborted".into())
        ]
    );

    let (ok, _, _) = demo.change("dev", "parallel_with_failure");
    assert!(!ok);
    let parallel = steps(&demo, &demo.last_change());
    assert_eq!(
        parallel,
        [
            ("parallel_with_failure".into(), "error".into()),
            ("check_disk".into(), "success".into()),
            ("fail".into(), "error".into()),
            ("check_network".into(), "success".into())
        ]
    );
}

#[test]
fn conflicting_parallel_patch_fails_with_the_report() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "conflicting");
    assert!(!ok, "{stdout}");
    // Whichever sibling finished first landed its patch; the other was refused.
    let states = steps(&demo, &demo.last_change());
    let winner = match (&states[1].1[..], &states[2].1[..]) {
        ("success", "error") => "a",
        ("error", "success") => "b",
        other => panic!("expected one success and one conflict, got {other:?}"),
    };
    let logs = demo.ok(&["change", "show-logs", &demo.last_change()]);
    assert!(
        logs.contains(
            "conflicts with changes applied since version 2: /release (changed at /release)"
        ),
        "{logs}\n{stderr}"
    );
    for part in ["\"base\"", "\"applied\"", "\"rejected\"", "\"current\""] {
        assert!(logs.contains(part), "{logs}");
    }
    let env: Value = serde_json::from_str(&demo.ok(&[
        "environment",
        "show-properties",
        "--project",
        "demo",
        "--environment",
        "dev",
    ]))
    .unwrap();
    assert_eq!(
        env["release"]["version"], winner,
        "only the first patch landed"
    );
}

#[test]
fn dynamic_children_run() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "fan_out");
    assert!(ok, "{stdout}\n{stderr}");
    let states = steps(&demo, &demo.last_change());
    assert_eq!(
        states,
        [
            ("fan_out".into(), "success".into()),
            ("check_disk".into(), "success".into()),
            ("check_network".into(), "success".into())
        ]
    );
    assert!(stdout.contains("disk ok") && stdout.contains("network ok"));
}

#[test]
fn retry_reruns_at_the_same_sha_after_a_new_commit() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let first_sha = support::git(&demo.repo, &["rev-parse", "HEAD"]);
    let (ok, _, _) = demo.change("dev", "gated");
    assert!(!ok, "gated fails until allowed");
    let id = demo.last_change();
    std::fs::write(demo.repo.join("new.txt"), "new").unwrap();
    support::git(&demo.repo, &["add", "-A"]);
    support::git(&demo.repo, &["commit", "-q", "-m", "a new commit on main"]);
    let patch = r#"[{"op": "add", "path": "/allowed", "value": true}]"#;
    let mut child = demo
        .command(&[
            "environment",
            "patch-properties",
            "--project",
            "demo",
            "--environment",
            "dev",
            "--file",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), patch.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let out = demo.run(&["change", "retry", &id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("running commit {first_sha}")),
        "{stdout}"
    );
    assert_eq!(
        demo.json(&["change", "show", &id])["change"]["git_sha"],
        first_sha.as_str()
    );
}

#[test]
fn cancel_stops_the_action_with_sigterm_and_leaves_no_container() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let id = demo
        .ok(&support::create_args("dev", "sleep", &["--background"]))
        .trim()
        .to_owned();
    wait_for("the action to start", Duration::from_secs(60), || {
        demo.ok(&["change", "show-logs", &id]).contains("sleeping")
    });
    demo.ok(&["change", "cancel", &id]);
    wait_for("the change to end", Duration::from_secs(30), || {
        demo.json(&["change", "show", &id])["change"]["state"] != "running"
    });
    assert_eq!(
        demo.json(&["change", "show", &id])["change"]["state"],
        "cancelled"
    );
    // The action's trap runs only if SIGTERM reached it: SIGKILL after the grace period would leave no line.
    let logs = demo.ok(&["change", "show-logs", &id]);
    assert!(
        logs.contains("sleep caught SIGTERM, cleaning up"),
        "the cancel reached the action as SIGTERM: {logs}"
    );
    assert!(labelled("runner.change", &id).await_blocking().is_empty());
}

#[test]
fn runner_secret_canary_is_absent_from_inspect_logs_and_store() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let canary = "runner-canary-93b1d7";
    demo.ok(&[
        "secret",
        "set",
        "opschain-runner-env",
        &format!("DEMO_TOKEN={canary}"),
    ]);
    let id = demo
        .ok(&support::create_args(
            "dev",
            "show_secret",
            &["--background"],
        ))
        .trim()
        .to_owned();
    wait_for("the step container", Duration::from_secs(60), || {
        !labelled("runner.change", &id).await_blocking().is_empty()
    });
    let container = labelled("runner.change", &id).await_blocking().remove(0);
    let inspect = async {
        docker()
            .await
            .inspect_container(container.id.as_deref().unwrap(), None)
            .await
            .unwrap()
    }
    .await_blocking();
    let inspected = serde_json::to_string(&inspect).unwrap();
    assert!(
        !inspected.contains(canary),
        "docker inspect shows the secret"
    );
    assert!(inspected.contains("runner.owner"));
    wait_for("the change to end", Duration::from_secs(60), || {
        demo.json(&["change", "show", &id])["change"]["state"] == "success"
    });
    let logs = demo.ok(&["change", "show-logs", &id]);
    assert!(
        logs.contains("token is ***"),
        "the secret reached the step, masked in its log: {logs}"
    );
    assert!(!logs.contains(canary));
    for file in ["runner.db", "runner.db-wal"] {
        let bytes = std::fs::read(demo.home.path().join(file)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(canary),
            "{file} holds the secret"
        );
    }
    let background_log =
        std::fs::read_to_string(demo.home.path().join(format!("logs/{id}.log"))).unwrap();
    assert!(!background_log.contains(canary));
}

#[test]
fn kill_dash_nine_then_restart_reaps_the_container_and_fails_the_change() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let mut child = demo
        .command(&support::create_args("dev", "sleep", &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut id = String::new();
    wait_for("the step container", Duration::from_secs(60), || {
        let list = demo.json(&["change", "list"]);
        if let Some(change) = list.as_array().and_then(|l| l.first()) {
            id = change["id"].as_str().unwrap().to_owned();
            return !labelled("runner.change", &id).await_blocking().is_empty();
        }
        false
    });
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    assert!(
        !labelled("runner.change", &id).await_blocking().is_empty(),
        "the container outlived its runner"
    );
    // The next runner to start cleans up.
    let (ok, _, stderr) = demo.change("prod", "noop");
    assert!(ok, "{stderr}");
    assert!(labelled("runner.change", &id).await_blocking().is_empty());
    let change = demo.json(&["change", "show", &id]);
    assert_eq!(change["change"]["state"], "error");
    assert!(
        change["change"]["reason"]
            .as_str()
            .unwrap()
            .contains("died"),
        "{change}"
    );
}

#[test]
fn two_runners_on_different_environments_run_side_by_side() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let children: Vec<_> = ["dev", "prod"]
        .iter()
        .map(|env| {
            demo.command(&support::create_args(env, "show_secret", &[]))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "neither runner disturbs the other: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Their steps overlapped in time: each started before the other finished.
    let list = demo.json(&["change", "list"]);
    let spans: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let steps = demo.json(&["change", "show", c["id"].as_str().unwrap()]);
            let step = &steps["steps"][0];
            (
                step["started_at"].as_str().unwrap().to_owned(),
                step["finished_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1,
        "{spans:?}"
    );
}

#[test]
fn a_step_past_its_timeout_gets_sigterm_and_is_removed() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let started = Instant::now();
    let (ok, stdout, stderr) = demo.change("dev", "too_slow");
    assert!(!ok);
    assert!(
        stderr.contains("step too_slow timed out after 2s"),
        "{stderr}"
    );
    assert!(stdout.contains("starting"), "{stdout}");
    assert!(
        stdout.contains("too_slow caught SIGTERM, cleaning up"),
        "the timeout reached the action as SIGTERM, not SIGKILL: {stdout}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the step was stopped, not waited for"
    );
    assert!(labelled("runner.change", &demo.last_change())
        .await_blocking()
        .is_empty());
}

#[test]
fn changes_through_runner_serve_with_server_flag() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = demo
        .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client_home = tempfile::tempdir().unwrap();
    let remote = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(args)
            .env("RUNNER_HOME", client_home.path())
            .env("RUNNER_SERVER", format!("http://127.0.0.1:{port}"))
            .output()
            .unwrap()
    };
    wait_for("runner serve", Duration::from_secs(30), || {
        remote(&["project", "list"]).status.success()
    });
    let out = remote(&support::create_args("dev", "deploy", &[]));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mode=development name=demo-app") && stdout.contains("released"),
        "{stdout}"
    );
    let list: Value =
        serde_json::from_slice(&remote(&["change", "list", "--output", "json"]).stdout).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let shown: Value =
        serde_json::from_slice(&remote(&["change", "show", &id, "--output", "json"]).stdout)
            .unwrap();
    assert_eq!(shown["change"]["state"], "success");
    assert_eq!(shown["steps"].as_array().unwrap().len(), 7);
    let release = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "release")
        .unwrap();
    let step: Value = serde_json::from_slice(
        &remote(&[
            "step",
            "show",
            release["id"].as_str().unwrap(),
            "--output",
            "json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(step["state"], "success");
    assert_eq!(step["environment_version"], 2);
    let logs = String::from_utf8_lossy(&remote(&["change", "show-logs", &id]).stdout).into_owned();
    assert!(logs.contains("[release] released"), "{logs}");
    // The same as the local view of the server's data directory.
    assert_eq!(logs, demo.ok(&["change", "show-logs", &id]));
    let failed = remote(&support::create_args("dev", "fail", &[]));
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("step fail exited with code 3"));
    let _ = server.kill();
    let _ = server.wait();
}

/// Networks (the runner's only other resource) carrying `label=value`.
async fn labelled_networks(label: &str, value: &str) -> Vec<bollard::models::Network> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    docker()
        .await
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .unwrap()
}

async fn labelled_volumes(label: &str, value: &str) -> Vec<bollard::models::Volume> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    docker()
        .await
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        }))
        .await
        .unwrap()
        .volumes
        .unwrap_or_default()
}

fn nothing_left(id: &str) {
    assert!(
        labelled("runner.change", id).await_blocking().is_empty(),
        "containers left for {id}"
    );
    assert!(
        labelled_networks("runner.change", id)
            .await_blocking()
            .is_empty(),
        "networks left for {id}"
    );
    assert!(
        labelled_volumes("runner.change", id)
            .await_blocking()
            .is_empty(),
        "volumes left for {id}"
    );
}

#[test]
fn a_step_reaches_its_services_and_they_are_removed_after() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "with_service");
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(
        stdout.matches("hello-from-web").count(),
        2,
        "by name and by alias: {stdout}"
    );
    assert!(
        stdout.contains("[service web] web is starting"),
        "the service's log is kept with the step: {stdout}"
    );
    let id = demo.last_change();
    let step = demo.json(&["change", "show", &id])["steps"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let service_log = demo.ok(&[
        "change",
        "show-logs",
        &id,
        "--step",
        &step,
        "--service",
        "web",
    ]);
    assert_eq!(
        service_log.trim(),
        "[with_service] [service web] web is starting",
        "{service_log}"
    );
    nothing_left(&id);
    // Two steps with a service of the same name, in parallel: each has its own network.
    let (ok, stdout, stderr) = demo.change("dev", "services_in_parallel");
    assert!(ok, "{stdout}\n{stderr}");
    nothing_left(&demo.last_change());
}

#[test]
fn a_step_starts_within_half_a_second_of_its_service_being_ready_and_one_never_ready_fails() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "slow_service");
    assert!(
        ok,
        "the probe waited for the slow service: {stdout}\n{stderr}"
    );
    let (service_started, ready, step_started) = service_times(&stdout);
    assert!(
        ready - service_started >= 0.99,
        "the service listened 1 s after it started: {stdout}"
    );
    assert!(
        step_started >= ready,
        "the step started after the service was ready: {stdout}"
    );
    assert!(
        step_started - ready <= 0.5,
        "the step started {:.2} s after the service was ready (at most 0.5 s: probed, not slept): {stdout}",
        step_started - ready
    );
    nothing_left(&demo.last_change());
    let (ok, _, stderr) = demo.change("dev", "never_ready");
    assert!(!ok);
    assert!(
        stderr.contains("service \"web\" of step")
            && stderr.contains("was not ready after 2s: port 8080 never accepted a connection"),
        "{stderr}"
    );
    let logs = demo.ok(&["change", "show-logs", &demo.last_change()]);
    assert!(
        logs.contains("web is starting but will never listen"),
        "the failure shows the service's log: {logs}"
    );
    nothing_left(&demo.last_change());

    // One that exits is not waited for until its 10 minute readiness timeout: the step fails with its exit code.
    let (ok, stdout, stderr) = demo.change("dev", "service_exits");
    assert!(!ok);
    assert!(
        stderr.contains("service \"web\" of step")
            && stderr.contains("exited with code 4 before it was ready"),
        "{stderr}"
    );
    assert!(
        stdout.contains("  web cannot start: no config"),
        "the reason carries the service's last log lines: {stdout}"
    );
    nothing_left(&demo.last_change());
}

/// The seconds (kernel uptime, shared by every container) at which `slow_service`'s service started, became
/// ready and its step started, from the step's line `service times: started at S, ready at R; step started at T`.
fn service_times(stdout: &str) -> (f64, f64, f64) {
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("service times: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no service times in {stdout}"));
    let numbers: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 3, "{line}");
    (numbers[0], numbers[1], numbers[2])
}

#[test]
fn services_are_removed_on_cancel_and_after_kill_dash_nine() {
    if !support::docker_available() {
        return;
    }
    removed_on_cancel_and_after_kill_dash_nine("service_sleep");
}

#[test]
fn a_dind_daemon_and_its_volumes_are_removed_on_cancel_and_after_kill_dash_nine() {
    if !support::docker_available() {
        return;
    }
    removed_on_cancel_and_after_kill_dash_nine("dind_sleep");
}

/// `action` runs a long step beside one service container: cancel, then `kill -9` of the runner and a restart,
/// must each leave no container, network or volume of the change.
fn removed_on_cancel_and_after_kill_dash_nine(action: &str) {
    let demo = Demo::new();
    demo.set_policy(DOCKER_FOR_DEV);
    let id = demo
        .ok(&support::create_args("dev", action, &["--background"]))
        .trim()
        .to_owned();
    wait_for("the step container", Duration::from_secs(60), || {
        labelled("runner.change", &id).await_blocking().len() == 2
    });
    demo.ok(&["change", "cancel", &id]);
    wait_for("the change to end", Duration::from_secs(30), || {
        demo.json(&["change", "show", &id])["change"]["state"] != "running"
    });
    assert_eq!(
        demo.json(&["change", "show", &id])["change"]["state"],
        "cancelled"
    );
    nothing_left(&id);

    let mut child = demo
        .command(&support::create_args("dev", action, &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut killed = String::new();
    wait_for("the second step container", Duration::from_secs(60), || {
        killed = demo.last_change();
        killed != id && labelled("runner.change", &killed).await_blocking().len() == 2
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!labelled_networks("runner.change", &killed)
        .await_blocking()
        .is_empty());
    if action == "dind_sleep" {
        assert_eq!(
            labelled_volumes("runner.change", &killed)
                .await_blocking()
                .len(),
            2,
            "the daemon's storage and socket volumes outlived the killed runner"
        );
    }
    let (ok, _, stderr) = demo.change("prod", "noop");
    assert!(ok, "{stderr}");
    nothing_left(&killed);
}

/// The operator's grant the Docker steps of the demo need: both are root on the host, so off by default.
const DOCKER_FOR_DEV: &str =
    "[[grant]]\nproject = \"demo\"\nenvironment = \"dev\"\ndocker_socket = true\ndocker_dind = true\n";

#[test]
fn docker_socket_steps_reach_the_host_daemon() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    demo.set_policy(DOCKER_FOR_DEV);
    let (ok, stdout, stderr) = demo.change("dev", "docker_socket");
    assert!(ok, "{stdout}\n{stderr}");
    let host = async { docker().await.version().await.unwrap().version.unwrap() }.await_blocking();
    assert!(stdout.contains(&format!("server {host}")), "{stdout}");
}

#[test]
fn dind_steps_build_and_run_containers_in_a_daemon_of_their_own() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    demo.set_policy(DOCKER_FOR_DEV);
    let (ok, stdout, stderr) = demo.change("dev", "docker_in_docker");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("built-inside-dind"), "{stdout}");
    assert!(
        stdout.contains("images inside: 1"),
        "the step's daemon starts empty: {stdout}"
    );
    let on_host = async {
        docker()
            .await
            .inspect_image("runner-dind-probe:1")
            .await
            .is_ok()
    }
    .await_blocking();
    assert!(!on_host, "what the step built stays in its own daemon");
    nothing_left(&demo.last_change());
}

#[test]
fn a_service_image_is_built_from_the_repository_at_the_changes_commit() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let (ok, stdout, stderr) = demo.change("dev", "built_service");
    assert!(ok, "{stdout}\n{stderr}");
    let sha = demo.json(&["change", "show", &demo.last_change()])["change"]["git_sha"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        stdout.contains("hello-from-a-built-service")
            && stdout.contains(&format!("built at {sha}")),
        "{stdout}"
    );
    nothing_left(&demo.last_change());

    // A new commit changes the service: the next change builds it anew from that commit.
    std::fs::write(
        demo.repo.join("services/web/index.html"),
        "hello-from-the-second-commit\n",
    )
    .unwrap();
    support::git(&demo.repo, &["commit", "-qam", "change the service"]);
    let (ok, stdout, stderr) = demo.change("dev", "built_service");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("hello-from-the-second-commit"), "{stdout}");

    // A service whose Dockerfile is not in the repository fails the step, naming the path.
    std::fs::write(
        demo.repo.join(".opschain/actions.json"),
        r#"{"actions": {"gone": {"run": "true", "services": {"web": {"build": "nowhere/Dockerfile"}}}}}"#,
    )
    .unwrap();
    support::git(
        &demo.repo,
        &["commit", "-qam", "point at a missing Dockerfile"],
    );
    let (ok, _, stderr) = demo.change("dev", "gone");
    assert!(!ok);
    assert!(
        stderr.contains("failed to build the image of service \"web\" from nowhere/Dockerfile")
            && stderr.contains("nowhere/Dockerfile does not exist at commit"),
        "{stderr}"
    );
    nothing_left(&demo.last_change());
}

/// The entries of a cache directory of the demo's data directory (temporaries and locks aside).
fn cached(demo: &Demo, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(demo.home.path().join("cache").join(dir))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn cache_prune_removes_what_no_unfinished_change_uses_and_keeps_what_one_does() {
    if !support::docker_available() {
        return;
    }
    let demo = Demo::new();
    let id = demo
        .ok(&support::create_args("dev", "sleep", &["--background"]))
        .trim()
        .to_owned();
    wait_for("the action to start", Duration::from_secs(60), || {
        demo.ok(&["change", "show-logs", &id]).contains("sleeping")
    });
    let (tars, contexts) = (cached(&demo, "repo-tars"), cached(&demo, "contexts"));
    assert_eq!(tars.len(), 1, "{tars:?}");
    assert_eq!(contexts.len(), 1, "{contexts:?}");
    // Never images here: the daemon is shared with the other tests, whose fresh images must stay.
    let keep_images = ["--keep-images", "1000000"];

    let dry = demo.ok(&[&["cache", "prune", "--dry-run"][..], &keep_images].concat());
    assert!(
        dry.contains("would remove 0 items"),
        "the running change uses them: {dry}"
    );
    let out = demo.ok(&[&["cache", "prune"][..], &keep_images].concat());
    assert!(out.contains("removed 0 items"), "{out}");
    assert_eq!(cached(&demo, "repo-tars"), tars);

    demo.ok(&["change", "cancel", &id]);
    wait_for("the change to end", Duration::from_secs(30), || {
        demo.json(&["change", "show", &id])["change"]["state"] != "running"
    });
    let young = demo.ok(&[&["cache", "prune", "--older-than", "1d"][..], &keep_images].concat());
    assert!(
        young.contains("removed 0 items"),
        "all of it is younger: {young}"
    );
    let dry = demo.ok(&[&["cache", "prune", "--dry-run"][..], &keep_images].concat());
    assert!(
        dry.contains("would remove repo-tar ") && dry.contains("would remove context "),
        "{dry}"
    );
    assert_eq!(
        cached(&demo, "repo-tars"),
        tars,
        "a dry run removes nothing"
    );
    let json = demo.json(&[&["cache", "prune"][..], &keep_images].concat());
    assert!(json["bytes"].as_u64().unwrap() > 1000, "{json}");
    assert!(cached(&demo, "repo-tars").is_empty() && cached(&demo, "contexts").is_empty());

    let images = demo.ok(&["cache", "prune", "--dry-run"]);
    assert!(
        images.contains("would remove runner-step runner-step:"),
        "step images no unfinished change uses are candidates: {images}"
    );
    // What was pruned is rebuilt on demand.
    let (ok, _, stderr) = demo.change("dev", "noop");
    assert!(ok, "{stderr}");
    let bad = demo.run(&["cache", "prune", "--older-than", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a duration"));
}
