//! Named secrets (sets of KEY=VALUE), kept outside the properties store: one JSON file per secret under
//! `$RUNNER_HOME/secrets/`, mode 0600 in a 0700 directory. Values are only ever handed to the image build's
//! secret mount and the step's stdin; nothing here prints them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::properties::SecretKind;

/// A secret's keys and values. `Debug` shows keys only, so a stray `{:?}` cannot leak a value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretValues {
    /// The values, for masking them out of logs.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.0.values().map(String::as_str)
    }
    /// `KEY=VALUE` lines, the format `opschain-exec` and the agent read. Values with a newline are written with
    /// JSON escaping (`KEY="a\nb"`) and decoded on the other side.
    pub fn to_env_file(&self) -> Vec<u8> {
        let mut out = String::new();
        for (key, value) in &self.0 {
            if value.contains('\n') || value.starts_with('"') {
                out.push_str(&format!(
                    "{key}={}\n",
                    serde_json::Value::from(value.as_str())
                ));
            } else {
                out.push_str(&format!("{key}={value}\n"));
            }
        }
        out.into_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("invalid secret name {0:?}: use 1-100 letters, digits, `.`, `_` and `-`, not starting with `.`")]
    InvalidName(String),
    #[error(
        "invalid secret entry {entry:?}: write KEY=VALUE with KEY made of letters, digits and `_`"
    )]
    InvalidEntry { entry: String },
    #[error("secret {name:?} does not exist: create it with `runner secret set {name} KEY=VALUE…`{context}")]
    NotFound { name: String, context: String },
    #[error("failed to read env file {path}")]
    EnvFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("env file {path} line {line}: {message}")]
    EnvFileSyntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("failed to access the secrets directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The secrets directory.
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

/// The longest secret name: names become file names and appear in properties and errors.
pub const MAX_NAME_LEN: usize = 100;

/// Secret names: 1-100 letters, digits, `.`, `_` and `-`, not starting with `.` (they name files).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parses `KEY=VALUE` (VALUE may be empty; a JSON-quoted VALUE is decoded).
pub fn parse_entry(entry: &str) -> Result<(String, String), SecretError> {
    let invalid = || SecretError::InvalidEntry {
        entry: entry.split('=').next().unwrap_or_default().to_owned() + "=…",
    };
    let (key, value) = entry.split_once('=').ok_or_else(invalid)?;
    let key = key.trim();
    if !valid_key(key) {
        return Err(invalid());
    }
    let value = if value.starts_with('"') && value.ends_with('"') && value.len() >= 2 {
        serde_json::from_str(value).unwrap_or_else(|_| value[1..value.len() - 1].to_owned())
    } else {
        value.to_owned()
    };
    Ok((key.to_owned(), value))
}

/// Reads an env file: `KEY=VALUE` lines, blank lines and `#` comments skipped, `export ` prefix allowed.
pub fn read_env_file(path: &Path) -> Result<SecretValues, SecretError> {
    let text = fs::read_to_string(path).map_err(|source| SecretError::EnvFile {
        path: path.to_owned(),
        source,
    })?;
    let mut values = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = parse_entry(line).map_err(|_| SecretError::EnvFileSyntax {
            path: path.to_owned(),
            line: i + 1,
            message: "expected KEY=VALUE".into(),
        })?;
        values.insert(key, value);
    }
    Ok(SecretValues(values))
}

impl SecretStore {
    /// Opens `home/secrets`, creating it (0700) and the two default secrets (empty) on first use.
    pub fn open(home: &Path) -> Result<SecretStore, SecretError> {
        let dir = home.join("secrets");
        let io = |source| SecretError::Io {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        // Files an older runner or a copy left readable by others are made private again.
        for entry in fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            crate::data_dir::tighten(&path, crate::data_dir::FILE_MODE).map_err(io)?;
        }
        let store = SecretStore { dir };
        for kind in [SecretKind::Build, SecretKind::Runner] {
            if !store.path(kind.default_secret()).exists() {
                store.write(kind.default_secret(), &SecretValues::default())?;
            }
        }
        Ok(store)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn write(&self, name: &str, values: &SecretValues) -> Result<(), SecretError> {
        let path = self.path(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let io = |source| SecretError::Io {
            path: path.clone(),
            source,
        };
        // Created 0600 from the start (never briefly world-readable), then renamed over the old file atomically.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(&serde_json::to_vec(&values.0).expect("a map serialises"))
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)
    }

    /// Adds or replaces keys of secret `name` (creating it); other keys stay.
    pub fn set(&self, name: &str, entries: SecretValues) -> Result<(), SecretError> {
        if !valid_name(name) {
            return Err(SecretError::InvalidName(name.to_owned()));
        }
        let mut values = self.get(name).unwrap_or_default();
        values.0.extend(entries.0);
        self.write(name, &values)
    }

    pub fn get(&self, name: &str) -> Result<SecretValues, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::InvalidName(name.to_owned()));
        }
        let path = self.path(name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretError::NotFound {
                    name: name.to_owned(),
                    context: String::new(),
                })
            }
            Err(source) => return Err(SecretError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(SecretValues)
            .map_err(|source| SecretError::Corrupt { path, source })
    }

    /// Names and keys of every secret, sorted; never values.
    pub fn list(&self) -> Result<Vec<(String, Vec<String>)>, SecretError> {
        let io = |source| SecretError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map_err(io)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let name = name.strip_suffix(".json")?;
                valid_name(name).then(|| name.to_owned())
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let keys = self.get(&name)?.0.into_keys().collect();
                Ok((name, keys))
            })
            .collect()
    }

    pub fn delete(&self, name: &str) -> Result<(), SecretError> {
        self.get(name)?;
        let path = self.path(name);
        fs::remove_file(&path).map_err(|source| SecretError::Io { path, source })
    }

    /// Merges the named secrets in order (a later secret wins on a clashing key), as a change uses them.
    /// `why` names where the list came from, for the error when a name does not exist.
    pub fn resolve(&self, names: &[String], why: &str) -> Result<SecretValues, SecretError> {
        let mut merged = BTreeMap::new();
        for name in names {
            let values = self.get(name).map_err(|e| match e {
                SecretError::NotFound { name, .. } => SecretError::NotFound {
                    name,
                    context: format!(" (it is named in {why})"),
                },
                other => other,
            })?;
            merged.extend(values.0);
        }
        Ok(SecretValues(merged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_defaults_exist() {
        let home = tempfile::tempdir().unwrap();
        let store = SecretStore::open(home.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home.path().join("secrets")), 0o700);
        store
            .set(
                "db",
                SecretValues([("PASS".into(), "s3cret".into())].into()),
            )
            .unwrap();
        assert_eq!(mode(&home.path().join("secrets/db.json")), 0o600);
        let names: Vec<_> = store.list().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["db", "opschain-build-env", "opschain-runner-env"]);
        assert_eq!(format!("{:?}", store.get("db").unwrap()), "{\"PASS\"}");
    }

    #[test]
    fn resolve_merges_in_order_and_names_missing() {
        let home = tempfile::tempdir().unwrap();
        let store = SecretStore::open(home.path()).unwrap();
        store
            .set(
                "a",
                SecretValues([("K".into(), "1".into()), ("A".into(), "a".into())].into()),
            )
            .unwrap();
        store
            .set("b", SecretValues([("K".into(), "2".into())].into()))
            .unwrap();
        let merged = store.resolve(&["a".into(), "b".into()], "x").unwrap();
        assert_eq!(merged.0["K"], "2");
        assert_eq!(merged.0["A"], "a");
        let err = store
            .resolve(&["nope".into()], "opschain.env:runner_secrets")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("named in opschain.env:runner_secrets"),
            "{err}"
        );
    }

    #[test]
    fn entries_parse_and_env_file_round_trips() {
        assert_eq!(parse_entry("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_entry("no-equals").is_err());
        assert!(parse_entry("1A=x").is_err());
        let values = SecretValues(
            [
                ("M".into(), "line1\nline2".into()),
                ("P".into(), "x".into()),
            ]
            .into(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        fs::write(&path, values.to_env_file()).unwrap();
        assert_eq!(read_env_file(&path).unwrap(), values);
        fs::write(&path, "# c\nexport A=1\nbroken line\n").unwrap();
        let err = read_env_file(&path).unwrap_err().to_string();
        assert!(err.ends_with("line 3: expected KEY=VALUE"), "{err}");
    }
}
