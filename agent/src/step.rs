//! The step container's entrypoint: reads `step_context.json`, prepares the environment and files the properties
//! ask for, runs the action, and writes `step_result.json` (seed 003's shape) with the property edits as RFC 6902
//! patches, any child steps the action asked for and how the action ended (`exit`: its code or the signal that
//! ended it, and the stop signals the agent forwarded to it; see `init`).

use base64::Engine;
use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::parse_env_lines;

fn phase(message: &str) {
    eprintln!("[opschain] {message}");
}

/// Objects merge key by key; anything else is replaced.
pub fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// repository < project < environment.
pub fn merged_properties(context: &Value) -> Value {
    let mut merged = json!({});
    for section in ["repository", "project", "environment"] {
        if let Some(props) = context.pointer(&format!("/{section}/properties")) {
            deep_merge(&mut merged, props);
        }
    }
    merged
}

/// Writes `opschain.files`: path → {mode, content, format raw|base64|json}. Relative paths are under `root`.
pub fn write_files(merged: &Value, root: &Path) -> Result<Vec<PathBuf>, String> {
    let Some(files) = merged.pointer("/opschain/files").and_then(Value::as_object) else {
        return Ok(vec![]);
    };
    let mut written = vec![];
    for (path, spec) in files {
        let target = if Path::new(path).is_absolute() {
            PathBuf::from(path)
        } else {
            root.join(path)
        };
        let format = spec.get("format").and_then(Value::as_str).unwrap_or("raw");
        let content = spec
            .get("content")
            .ok_or_else(|| format!("opschain.files[{path:?}] has no content"))?;
        let bytes = match (format, content) {
            ("json", value) => serde_json::to_vec_pretty(value).expect("a Value serialises"),
            ("raw", Value::String(s)) => s.clone().into_bytes(),
            ("base64", Value::String(s)) => base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| format!("opschain.files[{path:?}] is not valid base64: {e}"))?,
            (format, _) => {
                return Err(format!(
                    "opschain.files[{path:?}]: cannot write {format} content"
                ))
            }
        };
        let mode = match spec.get("mode") {
            Some(Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| format!("opschain.files[{path:?}].mode {s:?} is not octal"))?,
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0o644) as u32,
            _ => 0o644,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&target, bytes)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot chmod {}: {e}", target.display()))?;
        written.push(target);
    }
    Ok(written)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(value).expect("a Value serialises"),
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The seed 003 result document.
pub fn step_result(
    original_project: &Value,
    edited_project: &Value,
    original_environment: &Value,
    edited_environment: &Value,
    merged: &Value,
    children: &Value,
) -> Value {
    let empty = json!({});
    let (list, strategy) = match children {
        Value::Object(_) => (
            children
                .get("children")
                .cloned()
                .unwrap_or_else(|| json!([])),
            children
                .get("child_execution_strategy")
                .cloned()
                .unwrap_or(Value::Null),
        ),
        _ => (json!([]), Value::Null),
    };
    json!({
        "project": {"properties_diff": json_patch::diff(or(original_project, &empty), edited_project)},
        "environment": {"properties_diff": json_patch::diff(or(original_environment, &empty), edited_environment)},
        "step": {"properties": merged},
        "steps": {"children": list, "child_execution_strategy": strategy},
    })
}

fn or<'a>(value: &'a Value, fallback: &'a Value) -> &'a Value {
    if value.is_null() {
        fallback
    } else {
        value
    }
}

pub fn main() -> Result<u8, String> {
    let root = std::env::var_os("OPSCHAIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/opschain".into());
    let context_path = root.join(".opschain/step_context.json");
    // The runner hands everything over on stdin in one read: the step context (written to step_context.json here,
    // before the action starts), the runner secrets (never container configuration) and a nonce that marks the
    // result line it reads back from our stderr. Without the envelope, step_context.json must already exist.
    let mut result_marker = None;
    let mut secrets = vec![];
    if std::env::var_os("OPSCHAIN_STDIN_ENVELOPE").is_some() {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the step envelope from stdin: {e}"))?;
        let envelope: Value = serde_json::from_str(&text)
            .map_err(|e| format!("the step envelope on stdin is not valid JSON: {e}"))?;
        let context = envelope
            .get("step_context")
            .ok_or("the step envelope has no step_context")?;
        std::fs::create_dir_all(root.join(".opschain"))
            .map_err(|e| format!("cannot create {}/.opschain: {e}", root.display()))?;
        write_json(&context_path, context)?;
        if let Some(map) = envelope.get("secrets").and_then(Value::as_object) {
            secrets = map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect();
        }
        result_marker = envelope
            .get("result_marker")
            .and_then(Value::as_str)
            .map(str::to_owned);
    } else if std::env::var_os("OPSCHAIN_SECRETS_ON_STDIN").is_some() {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read secrets from stdin: {e}"))?;
        secrets = parse_env_lines(&text);
    }
    // From here on a stop signal reaches the action, never kills the agent half-way. Until here (the runner
    // feeds the envelope once the step's services are ready) it simply ends the agent: nothing has started yet.
    crate::init::take_over();
    let context = read_json(&context_path)?;
    phase("initialising");

    let merged = merged_properties(&context);
    let original_project = context
        .pointer("/project/properties")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let original_environment = context
        .pointer("/environment/properties")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let work = std::env::temp_dir().join(format!("opschain-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let project_file = work.join("project_properties.json");
    let environment_file = work.join("environment_properties.json");
    let children_file = work.join("child_steps.json");
    write_json(&project_file, &original_project)?;
    write_json(&environment_file, &original_environment)?;
    write_files(&merged, &root)?;

    let run = context
        .pointer("/action/run")
        .cloned()
        .unwrap_or(Value::Null);
    let mut command = match &run {
        Value::String(script) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(script);
            c
        }
        Value::Array(argv) if !argv.is_empty() => {
            let argv: Vec<String> = argv
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| a.to_string())
                })
                .collect();
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Value::Null => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg("true");
            c
        }
        other => {
            return Err(format!(
                "action.run must be a string or a list, found {other}"
            ))
        }
    };
    command
        .current_dir(&root)
        .env_remove("OPSCHAIN_SECRETS_ON_STDIN")
        .env_remove("OPSCHAIN_STDIN_ENVELOPE");
    if let Some(env) = merged.pointer("/opschain/env").and_then(Value::as_object) {
        for (key, value) in env {
            if let Some(value) = value.as_str() {
                command.env(key, value);
            }
        }
    }
    if let Some(env) = context.pointer("/action/env").and_then(Value::as_object) {
        for (key, value) in env {
            command.env(
                key,
                value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string()),
            );
        }
    }
    // Secrets win over a property of the same name (seed 003).
    for (key, value) in &secrets {
        command.env(key, value);
    }
    command
        .env("RUNNER_PROJECT_PROPERTIES", &project_file)
        .env("RUNNER_ENVIRONMENT_PROPERTIES", &environment_file)
        .env("RUNNER_CHILD_STEPS", &children_file)
        .env("OPSCHAIN_STEP_CONTEXT", &context_path)
        .stdin(std::process::Stdio::null());

    phase("running");
    let supervised = crate::init::supervise(&mut command)?;
    let code = supervised.ended.exit_code();
    if let Some(max) = &supervised.pids_limit {
        phase(&format!(
            "process limit reached (pids {max}): the action and everything it started were stopped"
        ));
    }
    for signal in &supervised.forwarded {
        phase(&format!(
            "forwarded {} to the action",
            crate::init::signal_name(*signal)
        ));
    }
    phase("completing");

    let edited_project = read_json(&project_file)?;
    let edited_environment = read_json(&environment_file)?;
    let children = match std::fs::read(&children_file) {
        Ok(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("$RUNNER_CHILD_STEPS is not valid JSON: {e}"))?
        }
        _ => Value::Null,
    };
    let mut result = step_result(
        &original_project,
        &edited_project,
        &original_environment,
        &edited_environment,
        &merged,
        &children,
    );
    result["exit"] = supervised.to_json();
    write_json(&root.join(".opschain/step_result.json"), &result)?;
    let _ = std::fs::remove_dir_all(&work);
    match supervised.ended {
        crate::init::Ended::Signalled(signal) => phase(&format!(
            "finished: the action was ended by {} (exit code {code})",
            crate::init::signal_name(signal)
        )),
        crate::init::Ended::Exited(_) => phase(&format!("finished with exit code {code}")),
    }
    if let Some(marker) = result_marker {
        // The same document, on one line the runner recognises by the nonce: no archive copy out of the container.
        eprintln!("[opschain-result {marker}] {result}");
    }
    Ok(code.clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_has_seed_003_shape_and_patches() {
        let result = step_result(
            &json!({"a": 1}),
            &json!({"a": 1, "b": 2}),
            &json!({"x": {"y": 1}}),
            &json!({}),
            &json!({"merged": true}),
            &json!({"children": [{"action": "c"}], "child_execution_strategy": "parallel"}),
        );
        assert_eq!(
            result["project"]["properties_diff"],
            json!([{"op": "add", "path": "/b", "value": 2}])
        );
        assert_eq!(
            result["environment"]["properties_diff"],
            json!([{"op": "remove", "path": "/x"}])
        );
        assert_eq!(result["step"]["properties"], json!({"merged": true}));
        assert_eq!(result["steps"]["children"], json!([{"action": "c"}]));
        assert_eq!(result["steps"]["child_execution_strategy"], "parallel");
        let none = step_result(
            &json!({}),
            &json!({}),
            &json!({}),
            &json!({}),
            &json!({}),
            &Value::Null,
        );
        assert_eq!(
            none["steps"],
            json!({"children": [], "child_execution_strategy": null})
        );
    }

    #[test]
    fn merges_and_writes_files() {
        let context = json!({
            "repository": {"properties": {"a": 1, "o": {"r": 1}}},
            "project": {"properties": {"o": {"p": 1}}},
            "environment": {"properties": {"a": 3, "opschain": {"files": {
                "conf/app.conf": {"content": "x=1\n", "mode": "0600"},
                "data.bin": {"format": "base64", "content": "aGk="},
                "c.json": {"format": "json", "content": {"k": 1}}
            }}}}
        });
        let merged = merged_properties(&context);
        assert_eq!(merged["a"], 3);
        assert_eq!(merged["o"], json!({"r": 1, "p": 1}));
        let root = std::env::temp_dir().join(format!("agent-test-{}", std::process::id()));
        write_files(&merged, &root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("conf/app.conf")).unwrap(),
            "x=1\n"
        );
        assert_eq!(
            std::fs::metadata(root.join("conf/app.conf"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), b"hi");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
