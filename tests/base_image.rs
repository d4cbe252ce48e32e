//! The base runner image: built offline, runnable, idempotent.

mod support;

use std::process::Command;

fn build_base(home: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["image", "build-base"])
        .env("RUNNER_HOME", home)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn build_base_is_idempotent_and_the_image_runs_its_tools() {
    if !support::docker_available() {
        return;
    }
    support::static_agent();
    let home = tempfile::tempdir().unwrap();
    let (ok, first, stderr) = build_base(home.path());
    assert!(ok, "{stderr}");
    assert!(first.starts_with("sha256:"));
    let (ok, second, stderr) = build_base(home.path());
    assert!(ok, "{stderr}");
    assert_eq!(second, first);
    assert!(
        stderr.contains("up to date"),
        "a second build with the same inputs builds nothing: {stderr}"
    );

    let image = runner::image::base::default_reference();
    let out = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--label",
            "runner.owner=test",
            "--entrypoint",
            "/bin/sh",
            &image,
            "-c",
            "echo hi && git --version && ls /usr/bin/opschain-exec /usr/bin/opschain-properties",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hi") && stdout.contains("git version"),
        "{stdout}"
    );
}

#[test]
fn missing_inputs_are_named_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["image", "build-base"])
        .env("RUNNER_HOME", home.path())
        .env("RUNNER_AGENT_BIN", home.path().join("no-agent"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("the static in-container agent not found at")
            && stderr.contains("cargo build -p runner-agent"),
        "{stderr}"
    );
}

/// Runs this binary's Docker test in a child process whose DOCKER_HOST names a socket nobody serves.
fn docker_test_without_a_daemon(opt_out: Option<&str>) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "build_base_is_idempotent_and_the_image_runs_its_tools",
            "--exact",
        ])
        .env(
            "DOCKER_HOST",
            format!("unix://{}", dir.path().join("nobody.sock").display()),
        )
        .env_remove(support::SKIP_DOCKER)
        .env_remove("CI");
    if let Some(value) = opt_out {
        child.env(support::SKIP_DOCKER, value);
    }
    child.output().unwrap()
}

#[test]
fn docker_tests_fail_without_a_daemon_unless_skipping_is_asked_for() {
    let failed = docker_test_without_a_daemon(None);
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(!failed.status.success(), "{stdout}");
    assert!(
        stdout.contains("no Docker daemon answers") && stdout.contains("RUNNER_TEST_SKIP_DOCKER=1"),
        "the failure names the fix: {stdout}"
    );

    let not_one = docker_test_without_a_daemon(Some("yes"));
    assert!(
        !not_one.status.success(),
        "only the explicit value 1 opts out"
    );

    let skipped = docker_test_without_a_daemon(Some("1"));
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains("*** SKIPPED build_base_is_idempotent_and_the_image_runs_its_tools"),
        "a skip is said out loud: {stderr}"
    );
}

/// After `cargo install`, only the binary is there: a copy of it, run from elsewhere with no source tree and no
/// agent override, builds the base image from what it carries (the agent, the Dockerfile).
#[tokio::test(flavor = "multi_thread")]
async fn an_installed_binary_builds_the_base_image_without_the_source_tree() {
    if !support::docker_available() {
        return;
    }
    let installed = tempfile::tempdir().unwrap();
    let exe = installed.path().join("bin/runner");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_runner"), &exe).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let reference = format!(
        "runner-test/installed-base:{}",
        uuid::Uuid::new_v4().simple()
    );
    let out = Command::new(&exe)
        .args(["image", "build-base"])
        .current_dir(elsewhere.path())
        .env("RUNNER_HOME", home.path())
        .env("RUNNER_BASE_IMAGE", &reference)
        .env_remove("RUNNER_AGENT_BIN")
        .env_remove("CARGO_MANIFEST_DIR")
        .output()
        .unwrap();
    let docker = runner::executor::docker::connect().await.unwrap();
    let inspected = docker.inspect_image(&reference).await;
    let _ = docker
        .remove_image(
            &reference,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = inspected.expect("the image exists under the name asked for");
    assert_eq!(
        Some(String::from_utf8_lossy(&out.stdout).trim()),
        image.id.as_deref()
    );
    let agent = std::fs::read_dir(home.path().join("agent"))
        .expect("the carried agent is written out under the data directory")
        .count();
    assert_eq!(agent, 1);
}
