//! The in-container side of a step. One static binary, three names:
//! - `opschain-agent` (the step container's entrypoint) runs the step and writes `step_result.json`;
//! - `opschain-properties` lets a shell action read and edit the project and environment properties;
//! - `opschain-exec` runs a Dockerfile `RUN` command with the build's variables and secrets.

mod exec;
mod init;
mod properties;
mod step;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let program = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
        .unwrap_or_default();
    // Called by a link's name, or as `opschain-agent <tool> …`.
    let tool = match program.as_str() {
        "opschain-exec" | "opschain-properties" => program,
        _ if matches!(args.get(1).map(String::as_str), Some("exec" | "properties")) => {
            format!("opschain-{}", args.remove(1))
        }
        _ => String::new(),
    };
    let result = match tool.as_str() {
        "opschain-exec" => exec::main(&args[1..]),
        "opschain-properties" => properties::main(&args[1..]),
        _ => step::main(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!(
                "{}: {message}",
                if tool.is_empty() {
                    "opschain-agent"
                } else {
                    &tool
                }
            );
            ExitCode::from(2)
        }
    }
}

/// Parses `KEY=VALUE` lines (blank lines and `#` comments skipped; a JSON-quoted value is decoded).
pub fn parse_env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let value = if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                serde_json::from_str(value).unwrap_or_else(|_| value[1..value.len() - 1].to_owned())
            } else {
                value.to_owned()
            };
            Some((key.trim().to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_lines() {
        let parsed = super::parse_env_lines("# c\nA=1\n\nB=x=y\nM=\"l1\\nl2\"\nbad\n");
        assert_eq!(
            parsed,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("M".into(), "l1\nl2".into())
            ]
        );
    }
}
