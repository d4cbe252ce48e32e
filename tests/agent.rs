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
