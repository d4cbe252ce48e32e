//! The `opschain` section of properties: environment variables, files written into the step, and which named
//! secrets reach the image build and the step.

use base64::Engine;
use serde_json::Value;

/// What is wrong with an `opschain` section, precisely enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpschainError {
    #[error("`opschain` must be an object, found {found}")]
    NotAnObject { found: &'static str },
    #[error("`opschain.env` must be an object of VARIABLE: \"value\", found {found}")]
    EnvNotAnObject { found: &'static str },
    #[error("`opschain.env.{var}` must be a string, found {found}: quote the value")]
    EnvValueNotString { var: String, found: &'static str },
    #[error("`opschain.env` has an invalid variable name {var:?}: use letters, digits and `_`, not starting with a digit")]
    EnvVarName { var: String },
    #[error(
        "`opschain.files` must be an object of path: {{mode, content, format}}, found {found}"
    )]
    FilesNotAnObject { found: &'static str },
    #[error("`opschain.files[{path:?}]` must be an object with `content` (and optional `mode`, `format`), found {found}")]
    FileNotAnObject { path: String, found: &'static str },
    #[error("`opschain.files[{path:?}]` has no `content`")]
    FileContentMissing { path: String },
    #[error("`opschain.files[{path:?}].mode` is {value}: give an octal string like \"0644\" or a number")]
    FileMode { path: String, value: String },
    #[error("`opschain.files[{path:?}].format` is {value}: use \"raw\", \"base64\" or \"json\"")]
    FileFormat { path: String, value: String },
    #[error("`opschain.files[{path:?}].content` {reason}")]
    FileContent { path: String, reason: String },
    #[error("`opschain.{key}` must be a list of secret names, found {found}")]
    SecretList { key: &'static str, found: String },
}

/// How a file's `content` is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Raw,
    Base64,
    Json,
}

/// A file to write into the step's filesystem before its action runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyFile {
    pub path: String,
    pub mode: u32,
    pub format: FileFormat,
    pub content: Vec<u8>,
}

/// Which secret list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// Served to the image build as a secret mount (`opschain.env:build_secrets`).
    Build,
    /// Handed to the step's action (`opschain.env:runner_secrets`).
    Runner,
}

impl SecretKind {
    pub const fn key(self) -> &'static str {
        match self {
            SecretKind::Build => "env:build_secrets",
            SecretKind::Runner => "env:runner_secrets",
        }
    }
    /// The secret used when neither project nor environment names any.
    pub fn default_secret(self) -> &'static str {
        match self {
            SecretKind::Build => "opschain-build-env",
            SecretKind::Runner => "opschain-runner-env",
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn section(props: &Value) -> Result<Option<&serde_json::Map<String, Value>>, OpschainError> {
    match props.get("opschain") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(other) => Err(OpschainError::NotAnObject {
            found: kind_of(other),
        }),
    }
}

/// Checks every part of the `opschain` section of a properties document.
pub fn validate_opschain(props: &Value) -> Result<(), OpschainError> {
    env_vars(props)?;
    files(props)?;
    for kind in [SecretKind::Build, SecretKind::Runner] {
        secret_list(props, kind)?;
    }
    Ok(())
}

fn valid_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// `opschain.env` as (VAR, value) pairs, in document order.
pub fn env_vars(props: &Value) -> Result<Vec<(String, String)>, OpschainError> {
    let Some(section) = section(props)? else {
        return Ok(vec![]);
    };
    let env = match section.get("env") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Object(env)) => env,
        Some(other) => {
            return Err(OpschainError::EnvNotAnObject {
                found: kind_of(other),
            })
        }
    };
    env.iter()
        .map(|(var, value)| {
            if !valid_var_name(var) {
                return Err(OpschainError::EnvVarName { var: var.clone() });
            }
            match value {
                Value::String(s) => Ok((var.clone(), s.clone())),
                other => Err(OpschainError::EnvValueNotString {
                    var: var.clone(),
                    found: kind_of(other),
                }),
            }
        })
        .collect()
}

/// `opschain.files`, decoded.
pub fn files(props: &Value) -> Result<Vec<PropertyFile>, OpschainError> {
    let Some(section) = section(props)? else {
        return Ok(vec![]);
    };
    let files = match section.get("files") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Object(files)) => files,
        Some(other) => {
            return Err(OpschainError::FilesNotAnObject {
                found: kind_of(other),
            })
        }
    };
    files.iter().map(|(path, spec)| file(path, spec)).collect()
}

fn file(path: &str, spec: &Value) -> Result<PropertyFile, OpschainError> {
    let spec = spec
        .as_object()
        .ok_or_else(|| OpschainError::FileNotAnObject {
            path: path.to_owned(),
            found: kind_of(spec),
        })?;
    let mode = match spec.get("mode") {
        None | Some(Value::Null) => 0o644,
        Some(Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| OpschainError::FileMode {
                path: path.to_owned(),
                value: format!("{s:?}"),
            })?,
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|m| *m <= 0o7777)
            .map(|m| m as u32)
            .ok_or_else(|| OpschainError::FileMode {
                path: path.to_owned(),
                value: n.to_string(),
            })?,
        Some(other) => {
            return Err(OpschainError::FileMode {
                path: path.to_owned(),
                value: other.to_string(),
            })
        }
    };
    let format = match spec.get("format") {
        None | Some(Value::Null) => FileFormat::Raw,
        Some(Value::String(s)) if s == "raw" => FileFormat::Raw,
        Some(Value::String(s)) if s == "base64" => FileFormat::Base64,
        Some(Value::String(s)) if s == "json" => FileFormat::Json,
        Some(other) => {
            return Err(OpschainError::FileFormat {
                path: path.to_owned(),
                value: other.to_string(),
            })
        }
    };
    let content = spec
        .get("content")
        .ok_or_else(|| OpschainError::FileContentMissing {
            path: path.to_owned(),
        })?;
    let content_error = |reason: String| OpschainError::FileContent {
        path: path.to_owned(),
        reason,
    };
    let bytes = match (format, content) {
        (FileFormat::Json, value) => serde_json::to_vec_pretty(value).expect("a Value serialises"),
        (FileFormat::Raw, Value::String(s)) => s.clone().into_bytes(),
        (FileFormat::Base64, Value::String(s)) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| content_error(format!("is not valid base64: {e}")))?,
        (_, other) => {
            return Err(content_error(format!(
                "must be a string for this format, found {}",
                kind_of(other)
            )))
        }
    };
    Ok(PropertyFile {
        path: path.to_owned(),
        mode,
        format,
        content: bytes,
    })
}

fn secret_list(props: &Value, kind: SecretKind) -> Result<Option<Vec<String>>, OpschainError> {
    let Some(section) = section(props)? else {
        return Ok(None);
    };
    match section.get(kind.key()) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => Err(OpschainError::SecretList {
                    key: kind.key(),
                    found: format!("an entry {other}"),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(OpschainError::SecretList {
            key: kind.key(),
            found: kind_of(other).to_owned(),
        }),
    }
}

/// The named secrets a change uses: the project's list, then the environment's (later ones win on a clashing
/// key). When neither names any, the default secret. Repository properties are never consulted.
pub fn secret_names(
    project: &Value,
    environment: &Value,
    kind: SecretKind,
) -> Result<Vec<String>, OpschainError> {
    Ok(named_secrets(project, environment, kind)?
        .unwrap_or_else(|| vec![kind.default_secret().to_owned()]))
}

/// The secrets the project's and environment's lists name, in order; `None` when neither has a list (a change
/// then uses the default secret).
pub fn named_secrets(
    project: &Value,
    environment: &Value,
    kind: SecretKind,
) -> Result<Option<Vec<String>>, OpschainError> {
    let project = secret_list(project, kind)?;
    let environment = secret_list(environment, kind)?;
    if project.is_none() && environment.is_none() {
        return Ok(None);
    }
    Ok(Some(
        project.into_iter().chain(environment).flatten().collect(),
    ))
}

/// Removes the secret lists from a repository layer (see [`super::layered_view`]).
pub(crate) fn strip_secret_lists(props: &mut Value) {
    if let Some(Value::Object(section)) = props.get_mut("opschain") {
        for kind in [SecretKind::Build, SecretKind::Runner] {
            section.remove(kind.key());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn env_values_must_be_strings() {
        let err = env_vars(&json!({"opschain": {"env": {"PORT": 8080}}})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`opschain.env.PORT` must be a string, found a number: quote the value"
        );
        let err = env_vars(&json!({"opschain": {"env": {"1X": "a"}}})).unwrap_err();
        assert!(matches!(err, OpschainError::EnvVarName { .. }));
        assert_eq!(
            env_vars(&json!({"opschain": {"env": {"A": "1", "B_2": ""}}})).unwrap(),
            vec![("A".into(), "1".into()), ("B_2".into(), "".into())]
        );
    }

    #[test]
    fn files_decode_each_format() {
        let props = json!({"opschain": {"files": {
            "/a.txt": {"content": "hi"},
            "b.bin": {"mode": "0600", "format": "base64", "content": "aGk="},
            "c.json": {"mode": 420, "format": "json", "content": {"k": 1}}
        }}});
        let files = files(&props).unwrap();
        assert_eq!(files[0].mode, 0o644);
        assert_eq!(files[1].content, b"hi");
        assert_eq!(files[1].mode, 0o600);
        assert_eq!(files[2].content, b"{\n  \"k\": 1\n}");
    }

    #[test]
    fn file_errors_name_the_file_and_problem() {
        let cases = [
            (
                json!({"x": {"content": "a", "mode": "9z"}}),
                "`opschain.files[\"x\"].mode` is \"9z\"",
            ),
            (
                json!({"x": {"content": "a", "format": "yaml"}}),
                "`opschain.files[\"x\"].format` is \"yaml\"",
            ),
            (
                json!({"x": {"mode": "0600"}}),
                "`opschain.files[\"x\"]` has no `content`",
            ),
            (
                json!({"x": {"content": "%%", "format": "base64"}}),
                "is not valid base64",
            ),
            (
                json!({"x": {"content": 5}}),
                "must be a string for this format, found a number",
            ),
            (json!({"x": "text"}), "must be an object with `content`"),
        ];
        for (spec, expected) in cases {
            let err = files(&json!({"opschain": {"files": spec}}))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }

    #[test]
    fn secret_lists_concatenate_and_default() {
        let none = json!({});
        assert_eq!(
            secret_names(&none, &none, SecretKind::Build).unwrap(),
            vec!["opschain-build-env"]
        );
        let p = json!({"opschain": {"env:runner_secrets": ["p1", "p2"]}});
        let e = json!({"opschain": {"env:runner_secrets": ["e1"]}});
        assert_eq!(
            secret_names(&p, &e, SecretKind::Runner).unwrap(),
            vec!["p1", "p2", "e1"]
        );
        let bad = json!({"opschain": {"env:build_secrets": "one"}});
        assert!(secret_names(&bad, &none, SecretKind::Build).is_err());
        assert!(validate_opschain(&bad).is_err());
    }
}
