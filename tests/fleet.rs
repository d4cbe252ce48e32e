//! Two runner hosts (separate data directories, separate processes) sharing one PostgreSQL store: one is killed
//! with SIGKILL while its step runs; the other host sees the change end with the dead runner named, runs the next
//! change on the same environment, and once the lost host's runner starts again nothing of the killed change is
//! left in Docker.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_step_loses_its_change_and_the_others_carry_on() {
    if !support::docker_available() || !support::postgres::postgres_available() {
        return;
    }
    let url = support::postgres::shared().database();
    // The demo project and its environments, created in the shared store (from host A's data directory).
    std::env::set_var("RUNNER_DATABASE_URL", &url);
    let host_a = support::Demo::new();
    std::env::remove_var("RUNNER_DATABASE_URL");
    let host_b = tempfile::tempdir().unwrap();

    let mut runner_a = host_a
        .command(&support::create_args("dev", "sleep", &[]))
        .env("RUNNER_DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Host B watches the shared store until host A's step runs.
    let deadline = Instant::now() + Duration::from_secs(180);
    let change = loop {
        let changes = json(host_b.path(), &url, &["change", "list"]);
        if let Some(c) = changes.as_array().and_then(|c| c.first()) {
            let id = c["id"].as_str().unwrap().to_owned();
            let shown = json(host_b.path(), &url, &["change", "show", &id]);
            let running = shown["steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["action"] == "sleep" && s["state"] == "running");
            if running && containers_of(&id).await > 0 {
                break id;
            }
        }
        assert!(Instant::now() < deadline, "host A's step never ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    runner_a.kill().unwrap();
    runner_a.wait().unwrap();

    // Host B: the change ends (the dead runner named), its running step failed.
    let shown = json(host_b.path(), &url, &["change", "show", &change]);
    assert_eq!(shown["change"]["state"], "error", "{shown}");
    let reason = shown["change"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("died"), "{reason}");
    let sleep = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["action"] == "sleep")
        .unwrap()
        .clone();
    assert_eq!(sleep["state"], "error", "{sleep}");

    // Host B runs the next change on the same environment: nothing is wedged.
    let next = on_host(
        host_b.path(),
        &url,
        &support::create_args("dev", "build", &[]),
    );
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );

    // Host B leaves host A's containers alone (they are A's Docker's: here one daemon stands in for both hosts').
    assert!(
        containers_of(&change).await > 0,
        "only the lost host's own runner touches its containers"
    );

    // Host A comes back: its runner removes what the killed one left running.
    let back = host_a
        .command(&["change", "list"])
        .env("RUNNER_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(back.status.success());
    let restarted = host_a
        .command(&support::create_args("prod", "build", &[]))
        .env("RUNNER_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        restarted.status.success(),
        "{}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    assert_eq!(
        containers_of(&change).await,
        0,
        "the killed change's container is gone"
    );
    // Neither host grew a SQLite store: both used the shared one.
    assert!(!host_a.home.path().join("runner.db").exists());
    assert!(!host_b.path().join("runner.db").exists());
}
