//! `opschain-exec CMD…`: for Dockerfile `RUN` lines. Exports the `env` of `step_context_env.json` and the build
//! secrets (the `opschain-build-env` secret mount, which wins), then replaces itself with CMD.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use crate::parse_env_lines;

fn context_env_path() -> PathBuf {
    let root = std::env::var_os("OPSCHAIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/opschain".into());
    root.join("step_context_env.json")
}

fn secrets_path() -> PathBuf {
    std::env::var_os("OPSCHAIN_BUILD_SECRETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/secrets/opschain-build-env".into())
}

pub fn main(args: &[String]) -> Result<u8, String> {
    let Some((program, rest)) = args.split_first() else {
        return Err("usage: opschain-exec COMMAND [ARG…]".into());
    };
    let mut command = std::process::Command::new(program);
    command.args(rest);
    let path = context_env_path();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let doc: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
            if let Some(env) = doc.get("env").and_then(|e| e.as_object()) {
                for (key, value) in env {
                    if let Some(value) = value.as_str() {
                        command.env(key, value);
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    if let Ok(text) = std::fs::read_to_string(secrets_path()) {
        for (key, value) in parse_env_lines(&text) {
            command.env(key, value);
        }
    }
    let err = command.exec();
    Err(format!("cannot run {program}: {err}"))
}
