//! `policy.toml` as written, and its checks: pure, so every mistake an operator can make is unit-tested.

use serde::Deserialize;
use std::path::Path;

use super::resources::{parse_size, ResourceLimits};
use super::{Grant, Policy, PolicyError, RunStepPolicy};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    steps: RawSteps,
    #[serde(default)]
    grant: Vec<RawGrant>,
    #[serde(default)]
    run_step: RawRunStep,
}

/// A size as text (`"1GiB"`) or bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Text(String),
    Bytes(u64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSteps {
    memory: Option<RawSize>,
    max_memory: Option<RawSize>,
    cpus: Option<f64>,
    max_cpus: Option<f64>,
    pids: Option<u64>,
    max_pids: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    project: String,
    environment: Option<String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    docker_socket: bool,
    #[serde(default)]
    docker_dind: bool,
    #[serde(default)]
    privileged_services: bool,
    #[serde(default)]
    base_images: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunStep {
    #[serde(default)]
    secrets: Vec<String>,
    remotes: Option<Vec<String>>,
    #[serde(default)]
    allow_file_remotes: bool,
    #[serde(default)]
    docker_socket: bool,
    #[serde(default)]
    docker_dind: bool,
    #[serde(default)]
    privileged_services: bool,
    #[serde(default)]
    base_images: Vec<String>,
}

/// Parses and checks the text of a policy file (`path` only names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned()
            + &e.span()
                .map(|span| format!(" (at {})", line_col(text, span.start)))
                .unwrap_or_default(),
    })?;
    let invalid = |setting: String, problem: String| PolicyError::Invalid {
        path: path.to_owned(),
        setting,
        problem,
    };
    let steps = steps(raw.steps, path)?;
    let mut grants = Vec::with_capacity(raw.grant.len());
    for (i, g) in raw.grant.into_iter().enumerate() {
        let setting = |name: &str| format!("[[grant]] #{} {name}", i + 1);
        if g.project != "*" && !valid_code(&g.project) {
            return Err(invalid(
                setting("project"),
                format!(
                    "{:?} is not a project code (or `*` for every project)",
                    g.project
                ),
            ));
        }
        if let Some(env) = &g.environment {
            if !valid_code(env) {
                return Err(invalid(
                    setting("environment"),
                    format!("{env:?} is not an environment code"),
                ));
            }
        }
        check_secrets(&g.secrets).map_err(|p| invalid(setting("secrets"), p))?;
        check_images(&g.base_images).map_err(|p| invalid(setting("base_images"), p))?;
        grants.push(Grant {
            project: g.project,
            environment: g.environment,
            secrets: g.secrets,
            docker_socket: g.docker_socket,
            docker_dind: g.docker_dind,
            privileged_services: g.privileged_services,
            base_images: g.base_images,
        });
    }
    let r = raw.run_step;
    check_secrets(&r.secrets).map_err(|p| invalid("run_step.secrets".into(), p))?;
    check_images(&r.base_images).map_err(|p| invalid("run_step.base_images".into(), p))?;
    if let Some(remotes) = &r.remotes {
        if let Some(bad) = remotes.iter().find(|p| p.trim().is_empty()) {
            return Err(invalid(
                "run_step.remotes".into(),
                format!("{bad:?} is empty: give URL prefixes such as \"https://git.example.com/\""),
            ));
        }
    }
    Ok(Policy {
        path: path.to_owned(),
        from_file: true,
        steps,
        grants,
        run_step: RunStepPolicy {
            secrets: r.secrets,
            remotes: r.remotes,
            allow_file_remotes: r.allow_file_remotes,
            docker_socket: r.docker_socket,
            docker_dind: r.docker_dind,
            privileged_services: r.privileged_services,
            base_images: r.base_images,
        },
    })
}

fn steps(raw: RawSteps, path: &Path) -> Result<ResourceLimits, PolicyError> {
    let size = |setting: &str, value: Option<RawSize>| -> Result<Option<u64>, PolicyError> {
        match value {
            None => Ok(None),
            Some(RawSize::Bytes(b)) => Ok(Some(b)),
            Some(RawSize::Text(t)) => {
                parse_size(&t)
                    .map(Some)
                    .map_err(|problem| PolicyError::Invalid {
                        path: path.to_owned(),
                        setting: format!("steps.{setting}"),
                        problem,
                    })
            }
        }
    };
    let defaults = ResourceLimits::default();
    let memory = size("memory", raw.memory)?.unwrap_or(defaults.memory);
    let cpus = raw.cpus.unwrap_or(defaults.cpus);
    let pids = raw.pids.unwrap_or(defaults.pids);
    // A default raised above the built-in maximum raises the maximum with it.
    let limits = ResourceLimits {
        memory,
        max_memory: size("max_memory", raw.max_memory)?.unwrap_or(defaults.max_memory.max(memory)),
        cpus,
        max_cpus: raw.max_cpus.unwrap_or(defaults.max_cpus.max(cpus)),
        pids,
        max_pids: raw.max_pids.unwrap_or(defaults.max_pids.max(pids)),
    };
    limits.check(path)?;
    Ok(limits)
}

fn check_secrets(names: &[String]) -> Result<(), String> {
    match names.iter().find(|n| !crate::secrets::valid_name(n)) {
        Some(bad) => Err(format!(
            "{bad:?} is not a secret name: use letters, digits, `.`, `_` and `-`"
        )),
        None => Ok(()),
    }
}

fn check_images(images: &[String]) -> Result<(), String> {
    match images
        .iter()
        .find(|i| i.trim().is_empty() || i.chars().any(char::is_whitespace))
    {
        Some(bad) => Err(format!(
            "{bad:?} is not an image reference such as \"runner/opschain-runner-debian:1\""
        )),
        None => Ok(()),
    }
}

/// Project and environment codes, as `runner project create` accepts them.
fn valid_code(code: &str) -> bool {
    crate::app::validate_code("code", code).is_ok()
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::resources::ResourceLimits;

    fn err(text: &str) -> String {
        parse(text, Path::new("/srv/policy.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_empty_file_is_the_safe_default() {
        let policy = parse("", Path::new("/srv/policy.toml")).unwrap();
        assert_eq!(policy.steps, ResourceLimits::default());
        assert!(policy.grants.is_empty());
        assert!(policy.run_step.secrets.is_empty());
        assert!(!policy.run_step.allow_file_remotes);
        assert_eq!(policy.run_step.remotes, None);
    }

    #[test]
    fn the_documented_example_parses() {
        let policy = parse(
            r#"
[steps]
memory = "1GiB"
max_memory = "4GiB"
cpus = 1.0
max_cpus = 2
pids = 512
max_pids = 4096

[[grant]]
project = "demo"
environment = "prod"
secrets = ["db-credentials", "git-demo"]
docker_socket = false
docker_dind = true
privileged_services = false
base_images = ["runner/opschain-runner-debian:1"]

[run_step]
secrets = []
remotes = ["https://git.example.com/"]
allow_file_remotes = false
"#,
            Path::new("/srv/policy.toml"),
        )
        .unwrap();
        assert_eq!(policy.steps.max_memory, 4 << 30);
        assert_eq!(policy.steps.max_cpus, 2.0);
        assert_eq!(policy.grants.len(), 1);
        assert!(policy.grants[0].docker_dind);
        assert_eq!(policy.grants[0].environment.as_deref(), Some("prod"));
        assert_eq!(
            policy.run_step.remotes,
            Some(vec!["https://git.example.com/".to_owned()])
        );
    }

    #[test]
    fn a_misspelt_setting_is_refused_with_its_place() {
        let e = err("[[grant]]\nproject = \"demo\"\ndocker_sockets = true\n");
        assert!(
            e.starts_with("invalid policy file /srv/policy.toml: unknown field `docker_sockets`"),
            "{e}"
        );
        assert!(e.contains("line 3"), "{e}");
        assert!(err("[step]\nmemory = \"1GiB\"\n").contains("unknown field `step`"));
        assert!(err("[[grant]]\nsecrets = [\"x\"]\n").contains("missing field `project`"));
        assert!(
            err("[[grant]]\nproject = \"demo\"\ndocker_socket = \"yes\"\n")
                .contains("invalid type")
        );
        assert!(err("this is not toml").contains("invalid policy file /srv/policy.toml"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        assert_eq!(
            err("[[grant]]\nproject = \"Demo Project\"\n"),
            "invalid policy file /srv/policy.toml: [[grant]] #1 project: \"Demo Project\" is not a project code (or `*` for every project)"
        );
        assert!(err("[[grant]]\nproject = \"demo\"\nenvironment = \"\"\n")
            .contains("[[grant]] #1 environment"));
        assert!(
            err("[[grant]]\nproject = \"demo\"\nsecrets = [\"../etc\"]\n")
                .contains("[[grant]] #1 secrets: \"../etc\" is not a secret name")
        );
        assert!(err("[[grant]]\nproject = \"demo\"\nbase_images = [\"\"]\n")
            .contains("[[grant]] #1 base_images"));
        assert!(err("[run_step]\nsecrets = [\"a b\"]\n").contains("run_step.secrets"));
        assert!(err("[run_step]\nremotes = [\" \"]\n").contains("run_step.remotes"));
        assert!(err("[steps]\nmemory = \"lots\"\n").contains("steps.memory: invalid size"));
        assert!(
            err("[steps]\nmemory = \"1KiB\"\n").contains("steps.memory: 1KiB is below the minimum")
        );
        assert!(err("[steps]\nmemory = \"2GiB\"\nmax_memory = \"1GiB\"\n")
            .contains("steps.memory: the default 2GiB is above max_memory 1GiB"));
        assert!(err("[steps]\ncpus = 0\n").contains("steps.cpus"));
        assert!(err("[steps]\ncpus = nan\n").contains("steps.cpus"));
        assert!(err("[steps]\npids = 0\n").contains("steps.pids"));
        assert!(err("[steps]\npids = -1\n").contains("invalid value"));
        assert!(err("[steps]\nmax_memory = \"99999999999999TiB\"\n").contains("too large"));
    }

    #[test]
    fn a_default_raised_above_the_builtin_maximum_raises_the_maximum() {
        let policy = parse(
            "[steps]\nmemory = \"8GiB\"\ncpus = 4\npids = 10000\n",
            Path::new("p"),
        )
        .unwrap();
        assert_eq!(policy.steps.max_memory, 8 << 30);
        assert_eq!(policy.steps.max_cpus, 4.0);
        assert_eq!(policy.steps.max_pids, 10000);
        let bytes = parse("[steps]\nmemory = 268435456\n", Path::new("p")).unwrap();
        assert_eq!(bytes.steps.memory, 256 << 20);
    }
}
