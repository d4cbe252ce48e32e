//! The real (static) agent binary on a temporary root: context in, result out.

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn agent() -> PathBuf {
    support::static_agent()
}

fn run_agent(
    root: &Path,
    context: &Value,
    stdin: &str,
    extra_env: &[(&str, &str)],
) -> (i32, String, String) {
    std::fs::create_dir_all(root.join(".opschain")).unwrap();
    std::fs::write(
        root.join(".opschain/step_context.json"),
        context.to_string(),
    )
    .unwrap();
    let mut command = Command::new(agent());
    command
        .env("OPSCHAIN_ROOT", root)
        .env("OPSCHAIN_SECRETS_ON_STDIN", "1")
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", agent_links(root).display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A directory with `opschain-properties` linked to the agent, as the base image has.
fn agent_links(root: &Path) -> PathBuf {
    let bin = root.join(".bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("opschain-properties");
    if !link.exists() {
        std::os::unix::fs::symlink(agent(), &link).unwrap();
    }
    bin
}

fn context(run: Value) -> Value {
    json!({
        "context": {"project": {"code": "demo"}, "step": {"id": "s1", "action": "a"}},
        "repository": {"properties": {"from": "repo", "opschain": {"env": {"FROM_REPO": "r"}}}},
        "project": {"properties": {"version": "1", "list": [1, 2]}},
        "environment": {"properties": {"opschain": {
            "env": {"GREETING": "hello", "TOKEN": "from-properties"},
            "files": {"conf/app.conf": {"content": "port=80\n"}}
        }}},
        "action": {"run": run, "env": {"ACTION_VAR": "av"}}
    })
}

fn result(root: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(root.join(".opschain/step_result.json")).unwrap())
        .unwrap()
}

#[test]
fn runs_the_action_with_env_files_and_secrets_and_writes_patches() {
    let root = tempfile::tempdir().unwrap();
    let script = "echo \"$GREETING $FROM_REPO $ACTION_VAR $TOKEN\"; cat conf/app.conf; \
                  opschain-properties set --scope project /version '\"2\"' && \
                  opschain-properties set --scope environment /deployed/at 'now' && \
                  opschain-properties delete --scope project /list && \
                  opschain-properties get --scope project /version";
    let (code, stdout, stderr) = run_agent(
        root.path(),
        &context(json!(script)),
        "TOKEN=from-secret\n",
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("hello r av from-secret"),
        "secrets win over properties: {stdout}"
    );
    assert!(stdout.contains("port=80"));
    assert!(stdout.contains("\"2\""));
    assert!(
        stderr.contains("[opschain] initialising") && stderr.contains("[opschain] completing"),
        "{stderr}"
    );
    let r = result(root.path());
    let mut project_ops: Vec<Value> = r["project"]["properties_diff"].as_array().unwrap().clone();
    project_ops.sort_by_key(|o| o["path"].as_str().unwrap().to_owned());
    assert_eq!(
        project_ops,
        vec![
            json!({"op": "remove", "path": "/list"}),
            json!({"op": "replace", "path": "/version", "value": "2"})
        ]
    );
    assert_eq!(
        r["environment"]["properties_diff"],
        json!([{"op": "add", "path": "/deployed", "value": {"at": "now"}}])
    );
    assert_eq!(r["step"]["properties"]["from"], "repo");
    assert_eq!(
        r["steps"],
        json!({"children": [], "child_execution_strategy": null})
    );
}

#[test]
fn failing_action_keeps_its_exit_code_and_child_steps_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let (code, _, _) = run_agent(
        root.path(),
        &context(json!(["/bin/sh", "-c", "exit 7"])),
        "",
        &[],
    );
    assert_eq!(code, 7);
    assert!(
        root.path().join(".opschain/step_result.json").exists(),
        "a result even on failure"
    );

    let root = tempfile::tempdir().unwrap();
    let script = "echo '{\"children\":[{\"action\":\"x\"}],\"child_execution_strategy\":\"parallel\"}' > \"$RUNNER_CHILD_STEPS\"";
    let (code, _, stderr) = run_agent(root.path(), &context(json!(script)), "", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        result(root.path())["steps"],
        json!({"children": [{"action": "x"}], "child_execution_strategy": "parallel"})
    );
}

#[test]
fn malformed_context_and_bad_helper_use_fail_clearly() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join(".opschain")).unwrap();
    std::fs::write(root.path().join(".opschain/step_context.json"), "{").unwrap();
    let out = Command::new(agent())
        .env("OPSCHAIN_ROOT", root.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("step_context.json is not valid JSON"));

    let out = Command::new(agent())
        .args(["properties", "get", "/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scope is required"));

    let root = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_agent(
        root.path(),
        &context(json!("opschain-properties get --scope project /missing")),
        "",
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/missing is not set in the project properties"),
        "{stderr}"
    );
}

#[test]
fn exec_exports_context_env_and_build_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("step_context_env.json"),
        r#"{"env": {"A": "1", "S": "from-env"}, "context": {}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets"), "S=from-secret\n").unwrap();
    let out = Command::new(agent())
        .args(["exec", "/bin/sh", "-c", "echo $A $S"])
        .env("OPSCHAIN_ROOT", dir.path())
        .env("OPSCHAIN_BUILD_SECRETS", dir.path().join("secrets"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 from-secret");
}

/// Starts the agent on `root` with `run` as the action and waits until the action has created `started`.
fn start_agent(root: &Path, run: &str) -> std::process::Child {
    std::fs::create_dir_all(root.join(".opschain")).unwrap();
    std::fs::write(
        root.join(".opschain/step_context.json"),
        context(json!(run)).to_string(),
    )
    .unwrap();
    let child = Command::new(agent())
        .env("OPSCHAIN_ROOT", root)
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", agent_links(root).display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&root.join("started"));
    child
}

fn wait_for_file(path: &Path) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends `signal` to the agent alone (not its group, as docker-init or `docker kill` would) and waits for it.
fn signal_and_wait(child: std::process::Child, signal: &str) -> std::process::Output {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args(["-s", signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output().unwrap()));
    waited
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("the agent did not end within 10 s of SIG{signal}"))
}

#[test]
fn stop_signals_reach_the_actions_trap_and_the_result_is_still_written() {
    for signal in ["TERM", "INT", "HUP"] {
        let root = tempfile::tempdir().unwrap();
        // The trap runs only if the signal reached the action's shell: the agent's death would not deliver it.
        let child = start_agent(
            root.path(),
            "trap 'echo \"$0 caught\" > trapped; exit 7' TERM INT HUP; \
             opschain-properties set --scope project /cleaned '\"yes\"'; touch started; sleep 30; echo not-reached",
        );
        let out = signal_and_wait(child, signal);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            root.path().join("trapped").exists(),
            "SIG{signal} never reached the action's trap: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(7),
            "the agent exits with the action's code: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("not-reached"));
        let r = result(root.path());
        assert_eq!(
            r["exit"],
            json!({"code": 7, "signal": null, "forwarded_signals": [format!("SIG{signal}")]}),
            "{stderr}"
        );
        assert_eq!(
            r["project"]["properties_diff"],
            json!([{"op": "add", "path": "/cleaned", "value": "yes"}]),
            "the edits made before the stop are in the result"
        );
        assert!(
            stderr.contains(&format!("forwarded SIG{signal} to the action")),
            "{stderr}"
        );
    }
}

#[test]
fn an_action_killed_by_a_signal_is_reported_with_that_signal() {
    let root = tempfile::tempdir().unwrap();
    // No trap: the shell and its sleep, one process group, both die of the forwarded SIGTERM.
    let child = start_agent(root.path(), "touch started; sleep 30");
    let out = signal_and_wait(child, "TERM");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert_eq!(
        result(root.path())["exit"],
        json!({"code": null, "signal": "SIGTERM", "forwarded_signals": ["SIGTERM"]})
    );
    assert!(
        stderr.contains("the action was ended by SIGTERM (exit code 143)"),
        "{stderr}"
    );

    // A signal that does not come from the agent is reported too.
    let root = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_agent(root.path(), &context(json!("kill -USR1 $$")), "", &[]);
    assert_eq!(code, 128 + 10, "{stderr}");
    assert_eq!(
        result(root.path())["exit"],
        json!({"code": null, "signal": "SIGUSR1", "forwarded_signals": []})
    );
}

#[test]
fn orphans_of_the_action_come_back_to_the_agent_and_are_reaped() {
    let root = tempfile::tempdir().unwrap();
    // The subshell exits at once, orphaning its `sleep`: the agent (the action's parent) must adopt and reap it.
    let script = "(sleep 0.3 & echo $! > orphan); sleep 0.1; \
                  orphan=$(cat orphan); \
                  echo \"$(grep PPid /proc/$orphan/status | tr -dc 0-9) $PPID\" > parents; \
                  sleep 1; \
                  if [ -e /proc/$orphan ]; then cut -d' ' -f3 /proc/$orphan/stat > state; else echo gone > state; fi";
    let (code, _, stderr) = run_agent(root.path(), &context(json!(script)), "", &[]);
    assert_eq!(code, 0, "{stderr}");
    let parents = std::fs::read_to_string(root.path().join("parents")).unwrap();
    let (orphan_parent, agent) = parents.trim().split_once(' ').unwrap();
    assert_eq!(orphan_parent, agent, "the orphan was adopted by the agent");
    assert_eq!(
        std::fs::read_to_string(root.path().join("state"))
            .unwrap()
            .trim(),
        "gone",
        "the orphan ended and was reaped, not left a zombie"
    );
}

#[test]
fn the_action_starts_with_no_signal_blocked() {
    // Run directly (no shell, which might reset the mask itself): the agent's blocked stop signals must not leak.
    let root = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_agent(
        root.path(),
        &context(json!(["grep", "SigBlk", "/proc/self/status"])),
        "",
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "SigBlk:\t0000000000000000");
}
