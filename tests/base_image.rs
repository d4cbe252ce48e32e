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
