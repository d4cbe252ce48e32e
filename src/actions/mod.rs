//! The actions a project's repository declares in `.opschain/actions.{json,yaml,toml}`: parsing, and the checks
//! (unknown action, cycle, malformed entry) that must fail a change before anything runs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The files an action manifest may live in, in the order they are looked for.
pub const MANIFEST_PATHS: [&str; 4] = [
    ".opschain/actions.json",
    ".opschain/actions.yaml",
    ".opschain/actions.yml",
    ".opschain/actions.toml",
];

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub actions: BTreeMap<String, Action>,
}

/// One action: its own work (`run`), then its child actions (`steps`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Command>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    #[serde(default)]
    pub run_as: RunAs,
    #[serde(
        default,
        with = "duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub ignore_failure: bool,
    /// When the worker running the step is lost (its lease expired), run the step again on another worker
    /// rather than failing it. Only for steps that are safe to run twice.
    #[serde(default)]
    pub retry_on_worker_loss: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Containers started before the step and removed after it, reachable from it by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
    /// Docker access from the step (seed 004); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerAccess>,
    /// Limits of the step's container: less than the operator's defaults, or more up to the maximums.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<StepResourceAsk>,
}

/// What an action asks for its step container (`"resources": {"memory": "512MiB", "cpus": 0.5, "pids": 256}`);
/// the operator's policy decides what it gets.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepResourceAsk {
    /// e.g. `512MiB`, `1GiB`, or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Action {
    /// The resources this action asks for, in the policy's terms (memory was checked when the manifest was read).
    pub fn resource_request(&self) -> crate::policy::ResourceRequest {
        let ask = self.resources.clone().unwrap_or_default();
        crate::policy::ResourceRequest {
            memory: ask
                .memory
                .as_deref()
                .and_then(|m| crate::policy::parse_size(m).ok()),
            cpus: ask.cpus,
            pids: ask.pids,
        }
    }
}

/// How a step reaches a Docker daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DockerAccess {
    /// The host's daemon socket, bind-mounted: fast and shares the host's image cache, but gives the step root on
    /// the host.
    Socket,
    /// A daemon of the step's own (Docker-in-Docker), started as the step's service `docker`: isolated from the
    /// host's daemon and its cache, but the daemon's container runs with (nearly) every privilege.
    Dind,
}

/// The longest action name: names are stored with every step and shown in every listing.
pub const MAX_ACTION_NAME_LEN: usize = 100;
/// The longest service name: it becomes a host name (a DNS label).
pub const MAX_SERVICE_NAME_LEN: usize = 63;

/// The service name `docker: dind` takes for the step's own daemon (as GitLab's and Harness's dind services are
/// reached at `docker`).
pub const DIND_SERVICE: &str = "docker";

/// A service image built from the repository at the change's commit, instead of a local image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ServiceBuild {
    /// A Dockerfile's path in the repository; the context is the repository's root.
    Dockerfile(String),
    Spec {
        dockerfile: String,
        /// A directory of the repository; its root by default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<String>,
    },
}

impl ServiceBuild {
    pub fn dockerfile(&self) -> &str {
        match self {
            ServiceBuild::Dockerfile(path)
            | ServiceBuild::Spec {
                dockerfile: path, ..
            } => path,
        }
    }

    pub fn context(&self) -> &str {
        match self {
            ServiceBuild::Spec {
                context: Some(context),
                ..
            } => context,
            _ => ".",
        }
    }
}

/// A path inside the repository: relative, and never leaving it.
fn repository_path(path: &str) -> Result<(), String> {
    let p = std::path::Path::new(path);
    if path.trim().is_empty() {
        return Err("is empty".into());
    }
    if p.is_absolute() {
        return Err(format!(
            "{path:?} is absolute: give a path inside the repository"
        ));
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!(
            "{path:?} leaves the repository (`..`): give a path inside it"
        ));
    }
    Ok(())
}

/// A background service of a step (seeds 000/001): its own container on the step's private network.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// A local image: there is no registry to pull from. Exactly one of `image` and `build` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Build the image from the repository at the change's commit, with the builder step images use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<ServiceBuild>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub privileged: bool,
    /// `never` or `if-not-present`; both mean the image must exist locally here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,
    #[serde(
        default,
        with = "duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub readiness_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// e.g. `256Mi`, `1Gi`, `512M`, or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// How to tell a service is ready: a TCP port accepts connections, or a command in it exits 0.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    Tcp(u16),
    Exec(Vec<String>),
}

/// Bytes of a memory size such as `256Mi`, `1Gi`, `512M` or `1048576`.
pub fn parse_memory(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("invalid memory size {text:?}: write e.g. 256Mi"))?;
    let factor: i64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "invalid memory unit {other:?} in {text:?}: use Ki, Mi, Gi, K, M or G"
            ))
        }
    };
    Ok(number * factor)
}

/// A string runs under `/bin/sh -c`; a list is executed as is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// How an action's children run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunAs {
    /// One after another; stop at the first failure, the rest are aborted.
    #[default]
    Sequential,
    /// All at once; all are let finish; the parent fails if any failed.
    Parallel,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the repository has no action manifest at this commit: add .opschain/actions.json (or .yaml/.toml)")]
    Missing,
    #[error("{path} is malformed: {message}")]
    Malformed { path: String, message: String },
    #[error("action {action:?} is not defined in {path}; defined actions: {known}")]
    UnknownAction {
        path: String,
        action: String,
        known: String,
    },
    #[error("action {parent:?} in {path} lists step {child:?}, which is not defined")]
    UnknownStep {
        path: String,
        parent: String,
        child: String,
    },
    #[error("actions in {path} form a cycle: {}", cycle.join(" -> "))]
    Cycle { path: String, cycle: Vec<String> },
    #[error("action name {name:?} in {path} is invalid: use 1-{MAX_ACTION_NAME_LEN} printable characters")]
    BadActionName { path: String, name: String },
    #[error("action {action:?} in {path}: `resources` {problem}")]
    BadResources {
        path: String,
        action: String,
        problem: String,
    },
    #[error("action {action:?} in {path}: `run` must not be empty")]
    EmptyRun { path: String, action: String },
    #[error("action {action:?} in {path}: service {service:?} {problem}")]
    BadService {
        path: String,
        action: String,
        service: String,
        problem: String,
    },
}

impl Manifest {
    /// Parses a manifest file's bytes; the format follows the file's extension.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let malformed = |message: String| ManifestError::Malformed {
            path: path.to_owned(),
            message,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| malformed(e.to_string()))?;
        let manifest: Manifest = if path.ends_with(".json") {
            serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?
        } else if path.ends_with(".toml") {
            toml::from_str(text).map_err(|e| malformed(e.to_string()))?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| malformed(e.to_string()))?
        };
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// Every step names a defined action, no `run` is empty, and no action reaches itself.
    fn validate(&self, path: &str) -> Result<(), ManifestError> {
        for (name, action) in &self.actions {
            if name.is_empty()
                || name.chars().count() > MAX_ACTION_NAME_LEN
                || name.chars().any(char::is_control)
            {
                let shown: String = name.chars().take(MAX_ACTION_NAME_LEN).collect();
                return Err(ManifestError::BadActionName {
                    path: path.to_owned(),
                    name: if shown.len() < name.len() {
                        format!("{shown}…")
                    } else {
                        shown
                    },
                });
            }
            if let Some(memory) = action.resources.as_ref().and_then(|r| r.memory.as_deref()) {
                crate::policy::parse_size(memory).map_err(|problem| {
                    ManifestError::BadResources {
                        path: path.to_owned(),
                        action: name.clone(),
                        problem,
                    }
                })?;
            }
            let empty = match &action.run {
                Some(Command::Shell(s)) => s.trim().is_empty(),
                Some(Command::Exec(argv)) => argv.first().is_none_or(|a| a.is_empty()),
                None => false,
            };
            if empty {
                return Err(ManifestError::EmptyRun {
                    path: path.to_owned(),
                    action: name.clone(),
                });
            }
            if action.docker == Some(DockerAccess::Dind)
                && action.services.contains_key(DIND_SERVICE)
            {
                return Err(ManifestError::BadService {
                    path: path.to_owned(),
                    action: name.clone(),
                    service: DIND_SERVICE.into(),
                    problem: "clashes with `docker: dind`, whose daemon is the service `docker`: rename the service".into(),
                });
            }
            for (service_name, service) in &action.services {
                let bad = |problem: String| ManifestError::BadService {
                    path: path.to_owned(),
                    action: name.clone(),
                    service: service_name.clone(),
                    problem,
                };
                let valid_name = !service_name.is_empty()
                    && service_name.len() <= MAX_SERVICE_NAME_LEN
                    && service_name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !valid_name {
                    return Err(bad(format!("has an invalid name: use 1-{MAX_SERVICE_NAME_LEN} letters, digits, `-` and `_` (it becomes a hostname)")));
                }
                match (&service.image, &service.build) {
                    (Some(_), Some(_)) => {
                        return Err(bad("has both `image` and `build`: give one".into()))
                    }
                    (None, None) => {
                        return Err(bad("needs an `image` (a local one: there is no registry) or a `build` (a Dockerfile in the repository)".into()))
                    }
                    (Some(image), None) if image.trim().is_empty() => {
                        return Err(bad("needs an `image` (a local one: there is no registry)".into()))
                    }
                    (None, Some(build)) => {
                        repository_path(build.dockerfile())
                            .map_err(|e| bad(format!("has a build Dockerfile path that {e}")))?;
                        repository_path(build.context())
                            .map_err(|e| bad(format!("has a build context that {e}")))?;
                    }
                    _ => {}
                }
                if let Some(policy) = &service.pull_policy {
                    if policy != "never" && policy != "if-not-present" {
                        return Err(bad(format!("has pull_policy {policy:?}: use never or if-not-present (nothing can be pulled here)")));
                    }
                }
                if let Some(memory) = service.resources.as_ref().and_then(|r| r.memory.as_deref()) {
                    parse_memory(memory).map_err(bad)?;
                }
            }
            for child in &action.steps {
                if !self.actions.contains_key(child) {
                    return Err(ManifestError::UnknownStep {
                        path: path.to_owned(),
                        parent: name.clone(),
                        child: child.clone(),
                    });
                }
            }
        }
        // Depth-first search with colours: grey on the current path, black when fully explored.
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            Grey,
            Black,
        }
        fn visit<'a>(
            m: &'a Manifest,
            name: &'a str,
            colours: &mut BTreeMap<&'a str, Colour>,
            stack: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match colours.get(name) {
                Some(Colour::Black) => return None,
                Some(Colour::Grey) => {
                    let start = stack.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(name.to_owned());
                    return Some(cycle);
                }
                None => {}
            }
            colours.insert(name, Colour::Grey);
            stack.push(name);
            for child in &m.actions[name].steps {
                if let Some(cycle) = visit(m, child, colours, stack) {
                    return Some(cycle);
                }
            }
            stack.pop();
            colours.insert(name, Colour::Black);
            None
        }
        let mut colours = BTreeMap::new();
        for name in self.actions.keys() {
            if let Some(cycle) = visit(self, name, &mut colours, &mut vec![]) {
                return Err(ManifestError::Cycle {
                    path: path.to_owned(),
                    cycle,
                });
            }
        }
        Ok(())
    }

    /// `name` and every action its `steps` reach, each once.
    pub fn reachable<'a>(&'a self, name: &'a str) -> Vec<&'a str> {
        let mut seen: Vec<&str> = vec![];
        let mut todo = vec![name];
        while let Some(next) = todo.pop() {
            if seen.contains(&next) {
                continue;
            }
            seen.push(next);
            if let Some(action) = self.actions.get(next) {
                todo.extend(action.steps.iter().map(String::as_str));
            }
        }
        seen
    }

    /// The named action, or an error listing the defined ones.
    pub fn action(&self, path: &str, name: &str) -> Result<&Action, ManifestError> {
        self.actions
            .get(name)
            .ok_or_else(|| ManifestError::UnknownAction {
                path: path.to_owned(),
                action: name.to_owned(),
                known: self.actions.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

/// The longest duration any setting accepts (a step timeout, a grace period): a year. Longer ones are typos, and
/// would overflow the clock arithmetic they end up in.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Durations written as `90s`, `10m`, `1h`, `500ms` or a bare number of seconds, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: write e.g. 30s, 10m, 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    let too_long = || {
        format!(
            "duration {text:?} is too long: at most {}",
            format_duration(MAX_DURATION)
        )
    };
    let duration = Duration::try_from_secs_f64(seconds).map_err(|_| too_long())?;
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        ms if ms % 3_600_000 == 0 && ms > 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        /// Seconds as a number, or text such as `10m`; both go through one parser and its limits.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Seconds(u64),
            Fraction(f64),
            Text(String),
        }
        let text = match Option::<Written>::deserialize(d)? {
            None => return Ok(None),
            Some(Written::Seconds(s)) => s.to_string(),
            Some(Written::Fraction(f)) => f.to_string(),
            Some(Written::Text(t)) => t,
        };
        super::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{ "actions": {
        "deploy": { "description": "d", "steps": ["build", "release"], "run_as": "sequential" },
        "build":  { "run": "echo building", "timeout": "10m" },
        "release":{ "run": ["/bin/sh", "-c", "echo hi"], "ignore_failure": true, "env": {"K": "V"} } } }"#;

    #[test]
    fn parses_the_documented_shape() {
        let m = Manifest::parse(".opschain/actions.json", JSON.as_bytes()).unwrap();
        let deploy = m.action("a", "deploy").unwrap();
        assert_eq!(deploy.steps, ["build", "release"]);
        assert_eq!(deploy.run_as, RunAs::Sequential);
        assert_eq!(m.actions["build"].timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            m.actions["build"].run,
            Some(Command::Shell("echo building".into()))
        );
        assert!(m.actions["release"].ignore_failure);
        assert!(matches!(m.actions["release"].run, Some(Command::Exec(ref a)) if a.len() == 3));
    }

    #[test]
    fn retry_on_worker_loss_is_off_unless_asked_and_must_be_a_boolean() {
        let m = Manifest::parse(".opschain/actions.json", JSON.as_bytes()).unwrap();
        assert!(!m.actions["build"].retry_on_worker_loss);
        let on = r#"{ "actions": { "a": { "run": "true", "retry_on_worker_loss": true } } }"#;
        let m = Manifest::parse(".opschain/actions.json", on.as_bytes()).unwrap();
        assert!(m.actions["a"].retry_on_worker_loss);
        let bad = r#"{ "actions": { "a": { "run": "true", "retry_on_worker_loss": "yes" } } }"#;
        let e = Manifest::parse(".opschain/actions.json", bad.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("retry_on_worker_loss") || e.to_string().contains("boolean"),
            "{e}"
        );
    }

    #[test]
    fn yaml_and_toml_parse_too() {
        let yaml = "actions:\n  a:\n    run: echo a\n    steps: [b]\n    run_as: parallel\n  b:\n    run: [\"true\"]\n";
        let m = Manifest::parse(".opschain/actions.yaml", yaml.as_bytes()).unwrap();
        assert_eq!(m.actions["a"].run_as, RunAs::Parallel);
        let toml = "[actions.a]\nrun = \"echo a\"\ntimeout = 30\n";
        let m = Manifest::parse(".opschain/actions.toml", toml.as_bytes()).unwrap();
        assert_eq!(m.actions["a"].timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_manifests_fail_with_what_is_wrong() {
        let p = ".opschain/actions.json";
        let err = |text: &str| Manifest::parse(p, text.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            err(
                r#"{"actions": {"a": {"steps": ["b"]}, "b": {"steps": ["c"]}, "c": {"steps": ["a"]}}}"#
            ),
            "actions in .opschain/actions.json form a cycle: a -> b -> c -> a"
        );
        assert!(err(r#"{"actions": {"a": {"steps": ["zz"]}}}"#)
            .contains("lists step \"zz\", which is not defined"));
        assert!(err(r#"{"actions": {"a": {"rn": "x"}}}"#).contains("unknown field `rn`"));
        assert!(err(r#"{"actions": {"a": {"run": ""}}}"#).contains("`run` must not be empty"));
        assert!(err(r#"{"actions": {"a": {"timeout": "5 fortnights"}}}"#)
            .contains("invalid duration unit"));
        assert!(
            err(r#"{"actions": {"a": {"run_as": "random"}}}"#).contains("unknown variant `random`")
        );
        assert!(err(r#"{"actions": "#).contains("malformed"));
        let m = Manifest::parse(p, JSON.as_bytes()).unwrap();
        assert_eq!(
            m.action(p, "nope").unwrap_err().to_string(),
            "action \"nope\" is not defined in .opschain/actions.json; defined actions: build, deploy, release"
        );
    }

    #[test]
    fn services_parse_and_are_checked() {
        let p = ".opschain/actions.json";
        let m = Manifest::parse(p, br#"{"actions": {"it": {"run": "x", "services": {"db": {
            "image": "pg", "entrypoint": ["sh"], "command": ["-c", "x"], "env": {"K": "V"},
            "resources": {"cpus": 0.5, "memory": "256Mi"}, "readiness": {"tcp": 5432}, "readiness_timeout": "60s"}}}}}"#).unwrap();
        let db = &m.actions["it"].services["db"];
        assert_eq!(db.readiness, Some(Readiness::Tcp(5432)));
        assert_eq!(db.readiness_timeout, Some(Duration::from_secs(60)));
        assert_eq!(parse_memory("256Mi").unwrap(), 256 << 20);
        let err = |text: &str| Manifest::parse(p, text.as_bytes()).unwrap_err().to_string();
        assert!(
            err(r#"{"actions": {"it": {"services": {"db": {"image": ""}}}}}"#)
                .contains("needs an `image`")
        );
        assert!(
            err(r#"{"actions": {"it": {"services": {"d b": {"image": "x"}}}}}"#)
                .contains("invalid name")
        );
        assert!(err(
            r#"{"actions": {"it": {"services": {"db": {"image": "x", "pull_policy": "always"}}}}}"#
        )
        .contains("nothing can be pulled"));
        assert!(err(r#"{"actions": {"it": {"services": {"db": {"image": "x", "resources": {"memory": "5X"}}}}}}"#).contains("invalid memory unit"));
    }

    #[test]
    fn service_builds_and_dind_are_checked() {
        let p = ".opschain/actions.json";
        let m = Manifest::parse(
            p,
            br#"{"actions": {"it": {"run": "x", "docker": "dind", "services": {
            "api": {"build": "services/api/Dockerfile"},
            "web": {"build": {"dockerfile": "web/Dockerfile", "context": "web"}}}}}}"#,
        )
        .unwrap();
        let it = &m.actions["it"];
        assert_eq!(it.docker, Some(DockerAccess::Dind));
        let api = it.services["api"].build.as_ref().unwrap();
        assert_eq!(
            (api.dockerfile(), api.context()),
            ("services/api/Dockerfile", ".")
        );
        let web = it.services["web"].build.as_ref().unwrap();
        assert_eq!((web.dockerfile(), web.context()), ("web/Dockerfile", "web"));

        let err = |text: &str| Manifest::parse(p, text.as_bytes()).unwrap_err().to_string();
        assert!(
            err(r#"{"actions": {"it": {"services": {"db": {"image": "x", "build": "D"}}}}}"#)
                .contains("has both `image` and `build`")
        );
        assert!(err(r#"{"actions": {"it": {"services": {"db": {}}}}}"#).contains("or a `build`"));
        assert!(
            err(r#"{"actions": {"it": {"services": {"db": {"build": "/etc/Dockerfile"}}}}}"#)
                .contains("is absolute")
        );
        assert!(err(r#"{"actions": {"it": {"services": {"db": {"build": {"dockerfile": "D", "context": "../x"}}}}}}"#)
            .contains("build context that \"../x\" leaves the repository"));
        assert_eq!(
            err(r#"{"actions": {"it": {"docker": "dind", "services": {"docker": {"image": "x"}}}}}"#),
            "action \"it\" in .opschain/actions.json: service \"docker\" clashes with `docker: dind`, whose daemon is the service `docker`: rename the service"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn absurd_durations_are_refused_not_panicked_on() {
        for text in [
            "99999999999999999999h",
            "1e400",
            "366d",
            "8761h",
            "31536001",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        assert!(parse_duration("99999999999999999999h")
            .unwrap_err()
            .contains("too long: at most 8760h"));
        assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
        let p = ".opschain/actions.json";
        let err = |text: &str| Manifest::parse(p, text.as_bytes()).unwrap_err().to_string();
        assert!(
            err(r#"{"actions": {"a": {"run": "x", "timeout": "99999999999999999999h"}}}"#)
                .contains("too long")
        );
        assert!(
            err(r#"{"actions": {"a": {"run": "x", "timeout": 18446744073709551615}}}"#)
                .contains("too long")
        );
    }
}
