//! The operator's policy (`$RUNNER_HOME/policy.toml`, or `--policy FILE` / `RUNNER_POLICY`): which secrets and
//! privileged features each project or environment may use, the limits of step containers, and what
//! `StepRunnerService.RunStep` callers may use.
//!
//! Only the operator writes it. Nothing a project admin (token holder) or a repository sends can widen it, and an
//! absent file is the safe default: nothing privileged, only the built-in secrets `opschain-build-env` and
//! `opschain-runner-env` granted to every project, nothing granted to RunStep callers, no file-path remotes.
//! Every refusal names the setting that would allow it.

mod action;
mod file;
pub mod resources;

use std::path::{Path, PathBuf};

pub use file::parse;
pub use resources::{format_size, parse_size, ResourceLimits, ResourceRequest, StepResources};

/// The policy's file name in the data directory.
pub const FILE_NAME: &str = "policy.toml";

/// Secrets every project and environment may use without a grant.
pub const BUILT_IN_SECRETS: [&str; 2] = ["opschain-build-env", "opschain-runner-env"];

/// Something only the operator can allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// `docker: socket`: the host's daemon socket, root on the host.
    DockerSocket,
    /// `docker: dind`: a privileged daemon container of the step's own.
    DockerDind,
    /// A service with `privileged: true`.
    PrivilegedService,
    /// A base image other than the built-in one (the image reference).
    BaseImage(String),
}

impl Feature {
    /// What is refused, as the user wrote it.
    pub fn describe(&self) -> String {
        match self {
            Feature::DockerSocket => "docker: socket".into(),
            Feature::DockerDind => "docker: dind".into(),
            Feature::PrivilegedService => "a privileged service".into(),
            Feature::BaseImage(image) => format!("base image {image:?}"),
        }
    }

    /// The policy line that allows it.
    pub fn setting(&self) -> String {
        match self {
            Feature::DockerSocket => "docker_socket = true".into(),
            Feature::DockerDind => "docker_dind = true".into(),
            Feature::PrivilegedService => "privileged_services = true".into(),
            Feature::BaseImage(image) => format!("base_images = [{image:?}]"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("failed to read the policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid policy file {path}: {setting}: {problem}")]
    Invalid {
        path: PathBuf,
        setting: String,
        problem: String,
    },
    #[error("{what} is not allowed for project {project} environment {environment}: add `{setting}` to a [[grant]] for it in {path}")]
    Refused {
        what: String,
        project: String,
        environment: String,
        setting: String,
        path: PathBuf,
    },
    #[error("secret {name:?} (named in {named_in}) is not granted to project {project} environment {environment}: the operator grants it by adding {name:?} to `secrets` of a [[grant]] for it in {path}")]
    SecretNotGranted {
        name: String,
        named_in: String,
        project: String,
        environment: String,
        path: PathBuf,
    },
    #[error("{what} is not allowed for RunStep callers: add `{setting}` to [run_step] in {path}")]
    RunStepRefused {
        what: String,
        setting: String,
        path: PathBuf,
    },
    #[error("secret {name:?} is not granted to RunStep callers: the operator grants it by adding {name:?} to `secrets` of [run_step] in {path}")]
    RunStepSecretNotGranted { name: String, path: PathBuf },
    #[error("remote {remote:?} is not allowed for RunStep callers: {why}")]
    RemoteRefused { remote: String, why: String },
    #[error("the step asks for {what} {asked}, above the operator's maximum {maximum}: ask for at most {maximum}, or raise `{setting}` in [steps] of {path}")]
    OverLimit {
        what: &'static str,
        asked: String,
        maximum: String,
        setting: &'static str,
        path: PathBuf,
    },
    #[error("the step asks for {what} {asked}, below the minimum {minimum}")]
    BelowMinimum {
        what: &'static str,
        asked: String,
        minimum: String,
    },
}

impl PolicyError {
    /// Whether the policy refused something (as opposed to the policy file or the request being malformed).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PolicyError::Refused { .. }
                | PolicyError::SecretNotGranted { .. }
                | PolicyError::RunStepRefused { .. }
                | PolicyError::RunStepSecretNotGranted { .. }
                | PolicyError::RemoteRefused { .. }
        )
    }
}

/// Whose request the policy judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A change (or one of its steps) of a project's environment: judged by the `[[grant]]`s covering it.
    Change {
        project: &'a str,
        environment: &'a str,
    },
    /// A `StepRunnerService.RunStep` caller: judged by `[run_step]` alone.
    RunStep,
}

/// What one `[[grant]]` allows a project (every environment of it, or one).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grant {
    /// A project code, or `*` for every project.
    pub project: String,
    pub environment: Option<String>,
    pub secrets: Vec<String>,
    pub docker_socket: bool,
    pub docker_dind: bool,
    pub privileged_services: bool,
    pub base_images: Vec<String>,
}

impl Grant {
    fn covers(&self, project: &str, environment: &str) -> bool {
        (self.project == "*" || self.project == project)
            && self.environment.as_deref().is_none_or(|e| e == environment)
    }

    fn allows(&self, feature: &Feature) -> bool {
        match feature {
            Feature::DockerSocket => self.docker_socket,
            Feature::DockerDind => self.docker_dind,
            Feature::PrivilegedService => self.privileged_services,
            Feature::BaseImage(image) => self.base_images.iter().any(|i| i == image),
        }
    }
}

/// `[run_step]`: what `StepRunnerService.RunStep` callers may use (they bring their own properties, so nothing
/// of a project's grants applies to them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunStepPolicy {
    pub secrets: Vec<String>,
    /// URL prefixes network remotes must start with; `None` allows every network remote.
    pub remotes: Option<Vec<String>>,
    /// Whether a remote may be a path on the server's file system (`/srv/repo`, `file://…`).
    pub allow_file_remotes: bool,
    pub docker_socket: bool,
    pub docker_dind: bool,
    pub privileged_services: bool,
    pub base_images: Vec<String>,
}

/// The operator's policy. See the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The file it was read from, or where it would be (named in every refusal).
    path: PathBuf,
    /// Whether that file existed.
    from_file: bool,
    steps: ResourceLimits,
    grants: Vec<Grant>,
    run_step: RunStepPolicy,
}

impl Policy {
    /// The defaults, naming `path` as the file that would change them.
    pub fn defaults(path: &Path) -> Policy {
        Policy {
            path: path.to_owned(),
            from_file: false,
            steps: ResourceLimits::default(),
            grants: vec![],
            run_step: RunStepPolicy::default(),
        }
    }

    /// Reads `home/policy.toml`; an absent file gives the defaults.
    pub fn load(home: &Path) -> Result<Policy, PolicyError> {
        let path = home.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::defaults(&path)),
            Err(source) => Err(PolicyError::Read { path, source }),
        }
    }

    /// Reads a policy file the operator named (`--policy FILE`); it must exist.
    pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text, path)
    }

    /// `--policy FILE` when given, else `home/policy.toml` (absent = defaults).
    pub fn load_from(file: Option<&Path>, home: &Path) -> Result<Policy, PolicyError> {
        match file {
            Some(file) => Policy::load_file(file),
            None => Policy::load(home),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the policy came from a file (rather than being the defaults).
    pub fn from_file(&self) -> bool {
        self.from_file
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    pub fn run_step(&self) -> &RunStepPolicy {
        &self.run_step
    }

    fn grants_for<'a>(
        &'a self,
        project: &'a str,
        environment: &'a str,
    ) -> impl Iterator<Item = &'a Grant> + 'a {
        self.grants
            .iter()
            .filter(move |g| g.covers(project, environment))
    }

    /// Whether changes of `project`/`environment` may use secret `name`.
    pub fn secret_granted(&self, project: &str, environment: &str, name: &str) -> bool {
        BUILT_IN_SECRETS.contains(&name)
            || self
                .grants_for(project, environment)
                .any(|g| g.secrets.iter().any(|s| s == name))
    }

    /// Every secret named in `names` must be granted; `named_in` says where the list came from, for the error.
    pub fn require_secrets<'a>(
        &self,
        project: &str,
        environment: &str,
        names: impl IntoIterator<Item = &'a str>,
        named_in: &str,
    ) -> Result<(), PolicyError> {
        for name in names {
            if !self.secret_granted(project, environment, name) {
                return Err(PolicyError::SecretNotGranted {
                    name: name.to_owned(),
                    named_in: named_in.to_owned(),
                    project: project.to_owned(),
                    environment: environment.to_owned(),
                    path: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// `Ok` when a grant for `project`/`environment` allows `feature`; else an error naming the setting.
    pub fn require(
        &self,
        project: &str,
        environment: &str,
        feature: Feature,
    ) -> Result<(), PolicyError> {
        if self
            .grants_for(project, environment)
            .any(|g| g.allows(&feature))
        {
            return Ok(());
        }
        Err(PolicyError::Refused {
            what: feature.describe(),
            project: project.to_owned(),
            environment: environment.to_owned(),
            setting: feature.setting(),
            path: self.path.clone(),
        })
    }

    /// The defaults and maximums for step containers of `project`/`environment`.
    pub fn step_resources(&self, _project: &str, _environment: &str) -> ResourceLimits {
        self.steps
    }

    /// The limits of one step whose action asks for `request`.
    pub fn resolve_resources(
        &self,
        project: &str,
        environment: &str,
        request: &ResourceRequest,
    ) -> Result<StepResources, PolicyError> {
        self.step_resources(project, environment)
            .resolve(request, &self.path)
    }

    /// Whether RunStep callers may use secret `name`.
    pub fn run_step_secret_granted(&self, name: &str) -> bool {
        self.run_step.secrets.iter().any(|s| s == name)
    }

    pub fn require_run_step_secrets<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), PolicyError> {
        match names
            .into_iter()
            .find(|name| !self.run_step_secret_granted(name))
        {
            Some(name) => Err(PolicyError::RunStepSecretNotGranted {
                name: name.to_owned(),
                path: self.path.clone(),
            }),
            None => Ok(()),
        }
    }

    /// `Ok` when `subject` may use `feature`.
    pub fn require_for(&self, subject: Subject<'_>, feature: Feature) -> Result<(), PolicyError> {
        match subject {
            Subject::Change {
                project,
                environment,
            } => self.require(project, environment, feature),
            Subject::RunStep => self.require_run_step(feature),
        }
    }

    /// The secrets of one kind a step of `subject` gets. `named` is what the properties' lists name (`None`: no
    /// list, so the built-in default); every named secret must be granted. A RunStep caller that names nothing
    /// gets the built-in default only when `[run_step]` grants it.
    pub fn secrets_for(
        &self,
        subject: Subject<'_>,
        kind: crate::properties::SecretKind,
        named: Option<Vec<String>>,
    ) -> Result<Vec<String>, PolicyError> {
        let named_in = format!("opschain.{}", kind.key());
        match (subject, named) {
            (Subject::RunStep, None) => Ok(self
                .run_step_secret_granted(kind.default_secret())
                .then(|| kind.default_secret().to_owned())
                .into_iter()
                .collect()),
            (Subject::RunStep, Some(names)) => {
                self.require_run_step_secrets(names.iter().map(String::as_str))?;
                Ok(names)
            }
            (Subject::Change { .. }, None) => Ok(vec![kind.default_secret().to_owned()]),
            (
                Subject::Change {
                    project,
                    environment,
                },
                Some(names),
            ) => {
                self.require_secrets(
                    project,
                    environment,
                    names.iter().map(String::as_str),
                    &named_in,
                )?;
                Ok(names)
            }
        }
    }

    /// `Ok` when `[run_step]` allows `feature` for RunStep callers.
    pub fn require_run_step(&self, feature: Feature) -> Result<(), PolicyError> {
        let r = &self.run_step;
        let allowed = match &feature {
            Feature::DockerSocket => r.docker_socket,
            Feature::DockerDind => r.docker_dind,
            Feature::PrivilegedService => r.privileged_services,
            Feature::BaseImage(image) => r.base_images.iter().any(|i| i == image),
        };
        if allowed {
            Ok(())
        } else {
            Err(PolicyError::RunStepRefused {
                what: feature.describe(),
                setting: feature.setting(),
                path: self.path.clone(),
            })
        }
    }

    /// `Ok` when a RunStep caller may build from `remote`: a network remote (matching `remotes` when listed), or
    /// a file path only with `allow_file_remotes = true`.
    pub fn require_run_step_remote(&self, remote: &str) -> Result<(), PolicyError> {
        let refuse = |why: String| PolicyError::RemoteRefused {
            remote: remote.to_owned(),
            why,
        };
        let path = self.path.display();
        match RemoteKind::of(remote) {
            RemoteKind::File if self.run_step.allow_file_remotes => Ok(()),
            RemoteKind::File => Err(refuse(format!(
                "it is a path on the server; the operator allows those: add `allow_file_remotes = true` to [run_step] in {path}"
            ))),
            RemoteKind::Unsupported => Err(refuse(
                "use an https://, http://, ssh:// or git:// URL, or user@host:path".into(),
            )),
            RemoteKind::Network => match &self.run_step.remotes {
                None => Ok(()),
                Some(prefixes) if prefixes.iter().any(|p| has_prefix(remote, p)) => Ok(()),
                Some(_) => Err(refuse(format!(
                    "it starts with none of the prefixes the operator allows: add one to `remotes` in [run_step] in {path}"
                ))),
            },
        }
    }
}

/// Where a remote points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteKind {
    Network,
    File,
    Unsupported,
}

impl RemoteKind {
    fn of(remote: &str) -> RemoteKind {
        let remote = remote.trim();
        if let Some((scheme, _)) = remote.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "http" | "https" | "ssh" | "git" => RemoteKind::Network,
                "file" => RemoteKind::File,
                _ => RemoteKind::Unsupported,
            };
        }
        if remote.contains("::") {
            // git's `transport::address` form (`ext::sh -c …`): never.
            return RemoteKind::Unsupported;
        }
        // scp-like `[user@]host:path`: a colon before any slash, and a host of more than a drive letter.
        match remote.split_once(':') {
            Some((host, _)) if !host.contains('/') && host.len() > 1 && !host.is_empty() => {
                RemoteKind::Network
            }
            _ if remote.is_empty() => RemoteKind::Unsupported,
            _ => RemoteKind::File,
        }
    }
}

/// `remote` starts with `prefix` at a boundary: `https://git.example.com` allows `https://git.example.com/x` but
/// not `https://git.example.com.evil.org/x`.
fn has_prefix(remote: &str, prefix: &str) -> bool {
    let remote = remote.trim();
    match remote.strip_prefix(prefix) {
        None => false,
        Some(rest) => {
            rest.is_empty() || prefix.ends_with(['/', ':']) || rest.starts_with(['/', ':'])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        parse(text, Path::new("/srv/runner/policy.toml")).unwrap()
    }

    #[test]
    fn an_absent_file_is_the_safe_default() {
        let home = tempfile::tempdir().unwrap();
        let p = Policy::load(home.path()).unwrap();
        assert!(!p.from_file());
        assert_eq!(p.path(), home.path().join("policy.toml"));
        assert!(p.secret_granted("demo", "dev", "opschain-build-env"));
        assert!(p.secret_granted("demo", "dev", "opschain-runner-env"));
        assert!(!p.secret_granted("demo", "dev", "db-credentials"));
        for feature in [
            Feature::DockerSocket,
            Feature::DockerDind,
            Feature::PrivilegedService,
            Feature::BaseImage("x:1".into()),
        ] {
            assert!(p.require("demo", "dev", feature.clone()).is_err());
            assert!(p.require_run_step(feature).is_err());
        }
        assert!(!p.run_step_secret_granted("opschain-runner-env"));
        assert!(p.require_run_step_remote("/srv/repo").is_err());
        assert!(p
            .require_run_step_remote("https://git.example.com/x.git")
            .is_ok());
    }

    #[test]
    fn a_named_policy_file_must_exist() {
        let home = tempfile::tempdir().unwrap();
        let missing = home.path().join("nope.toml");
        let e = Policy::load_from(Some(&missing), home.path()).unwrap_err();
        assert!(e.to_string().starts_with(&format!(
            "failed to read the policy file {}",
            missing.display()
        )));
        std::fs::write(home.path().join("policy.toml"), "[[grant]]\n").unwrap();
        let e = Policy::load(home.path()).unwrap_err().to_string();
        assert!(e.contains("missing field `project`"), "{e}");
    }

    #[test]
    fn refusals_name_the_setting_that_allows_them() {
        let p = policy("");
        assert_eq!(
            p.require("demo", "dev", Feature::DockerSocket).unwrap_err().to_string(),
            "docker: socket is not allowed for project demo environment dev: add `docker_socket = true` to a [[grant]] for it in /srv/runner/policy.toml"
        );
        assert!(p
            .require("demo", "dev", Feature::DockerDind)
            .unwrap_err()
            .to_string()
            .contains("add `docker_dind = true`"));
        assert!(p
            .require("demo", "dev", Feature::PrivilegedService)
            .unwrap_err()
            .to_string()
            .starts_with("a privileged service is not allowed"));
        assert!(p
            .require("demo", "dev", Feature::BaseImage("acme/base:2".into()))
            .unwrap_err()
            .to_string()
            .contains("add `base_images = [\"acme/base:2\"]`"));
        assert_eq!(
            p.require_secrets("demo", "dev", ["opschain-runner-env", "db"], "opschain.env:runner_secrets")
                .unwrap_err()
                .to_string(),
            "secret \"db\" (named in opschain.env:runner_secrets) is not granted to project demo environment dev: the operator grants it by adding \"db\" to `secrets` of a [[grant]] for it in /srv/runner/policy.toml"
        );
        assert_eq!(
            p.require_run_step(Feature::DockerSocket).unwrap_err().to_string(),
            "docker: socket is not allowed for RunStep callers: add `docker_socket = true` to [run_step] in /srv/runner/policy.toml"
        );
        assert!(p
            .require("demo", "dev", Feature::DockerSocket)
            .unwrap_err()
            .is_refusal());
    }

    #[test]
    fn grants_cover_their_project_and_environment_only() {
        let p = policy(
            r#"
[[grant]]
project = "demo"
environment = "prod"
secrets = ["db"]
docker_dind = true

[[grant]]
project = "demo"
secrets = ["git"]
privileged_services = true
base_images = ["acme/base:2"]

[[grant]]
project = "*"
secrets = ["shared"]
"#,
        );
        assert!(p.secret_granted("demo", "prod", "db"));
        assert!(!p.secret_granted("demo", "dev", "db"));
        assert!(!p.secret_granted("other", "prod", "db"));
        assert!(p.secret_granted("demo", "dev", "git"));
        assert!(!p.secret_granted("other", "dev", "git"));
        assert!(p.secret_granted("other", "dev", "shared"));
        assert!(p.require("demo", "prod", Feature::DockerDind).is_ok());
        assert!(p.require("demo", "dev", Feature::DockerDind).is_err());
        assert!(p.require("demo", "dev", Feature::PrivilegedService).is_ok());
        assert!(p
            .require("other", "dev", Feature::PrivilegedService)
            .is_err());
        assert!(p.require("demo", "prod", Feature::DockerSocket).is_err());
        assert!(p
            .require("demo", "dev", Feature::BaseImage("acme/base:2".into()))
            .is_ok());
        assert!(p
            .require("demo", "dev", Feature::BaseImage("acme/base:3".into()))
            .is_err());
        assert!(p
            .require_secrets("demo", "prod", ["db", "git", "shared"], "x")
            .is_ok());
    }

    #[test]
    fn run_step_uses_only_its_own_section() {
        let p = policy(
            r#"
[[grant]]
project = "*"
secrets = ["db"]
docker_socket = true

[run_step]
secrets = ["ci"]
docker_dind = true
"#,
        );
        assert!(p.run_step_secret_granted("ci"));
        assert!(!p.run_step_secret_granted("db"));
        assert!(p.require_run_step_secrets(["ci"]).is_ok());
        assert_eq!(
            p.require_run_step_secrets(["ci", "db"]).unwrap_err().to_string(),
            "secret \"db\" is not granted to RunStep callers: the operator grants it by adding \"db\" to `secrets` of [run_step] in /srv/runner/policy.toml"
        );
        assert!(p.require_run_step(Feature::DockerDind).is_ok());
        assert!(p.require_run_step(Feature::DockerSocket).is_err());
    }

    #[test]
    fn run_step_remotes_are_network_urls_unless_the_operator_allows_paths() {
        let p = policy("");
        for ok in [
            "https://git.example.com/a.git",
            "http://10.0.0.1/a",
            "ssh://git@host/a",
            "git://host/a",
            "git@github.com:org/a.git",
        ] {
            assert!(p.require_run_step_remote(ok).is_ok(), "{ok}");
        }
        for file in [
            "/srv/repo",
            "./repo",
            "repo",
            "file:///srv/repo",
            "../x:y",
            "C:/x",
        ] {
            let e = p.require_run_step_remote(file).unwrap_err().to_string();
            assert!(
                e.contains("add `allow_file_remotes = true`")
                    || e.contains("allow_file_remotes = true"),
                "{file}: {e}"
            );
        }
        for odd in ["ext::sh -c touch% /tmp/pwned", "ftp://host/x", ""] {
            let e = p.require_run_step_remote(odd).unwrap_err().to_string();
            assert!(e.contains("use an https://"), "{odd}: {e}");
        }
        let files = policy("[run_step]\nallow_file_remotes = true\n");
        assert!(files.require_run_step_remote("/srv/repo").is_ok());
        let listed = policy("[run_step]\nremotes = [\"https://git.example.com\", \"git@host:\"]\n");
        assert!(listed
            .require_run_step_remote("https://git.example.com/a.git")
            .is_ok());
        assert!(listed.require_run_step_remote("git@host:org/a").is_ok());
        let e = listed
            .require_run_step_remote("https://git.example.com.evil.org/a.git")
            .unwrap_err()
            .to_string();
        assert!(e.contains("add one to `remotes` in [run_step]"), "{e}");
        assert!(listed
            .require_run_step_remote("https://other.org/a")
            .is_err());
        assert!(listed.require_run_step_remote("/srv/repo").is_err());
    }

    #[test]
    fn secrets_for_a_change_or_a_run_step_caller() {
        use crate::properties::SecretKind::{Build, Runner};
        let p = policy("[[grant]]\nproject = \"demo\"\nsecrets = [\"db\"]\n[run_step]\nsecrets = [\"opschain-build-env\", \"ci\"]\n");
        let demo = Subject::Change {
            project: "demo",
            environment: "dev",
        };
        let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p.secrets_for(demo, Runner, None).unwrap(),
            ["opschain-runner-env"]
        );
        assert_eq!(
            p.secrets_for(demo, Runner, names(&["db", "opschain-runner-env"]))
                .unwrap(),
            ["db", "opschain-runner-env"]
        );
        let e = p
            .secrets_for(demo, Build, names(&["ci"]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("secret \"ci\" (named in opschain.env:build_secrets) is not granted to project demo environment dev"), "{e}");
        assert_eq!(
            p.secrets_for(Subject::RunStep, Build, None).unwrap(),
            ["opschain-build-env"]
        );
        assert!(p
            .secrets_for(Subject::RunStep, Runner, None)
            .unwrap()
            .is_empty());
        assert_eq!(
            p.secrets_for(Subject::RunStep, Runner, names(&["ci"]))
                .unwrap(),
            ["ci"]
        );
        let e = p
            .secrets_for(Subject::RunStep, Runner, names(&["db"]))
            .unwrap_err();
        assert!(e.is_refusal());
        assert!(e.to_string().contains("not granted to RunStep callers"));
    }

    #[test]
    fn step_resources_come_from_the_steps_section() {
        let p = policy("[steps]\nmemory = \"512MiB\"\nmax_memory = \"2GiB\"\n");
        let limits = p.step_resources("demo", "dev");
        assert_eq!(limits.memory, 512 << 20);
        assert_eq!(limits.max_memory, 2 << 30);
        let e = p
            .resolve_resources(
                "demo",
                "dev",
                &ResourceRequest {
                    memory: Some(3 << 30),
                    ..Default::default()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("raise `max_memory` in [steps] of /srv/runner/policy.toml"),
            "{e}"
        );
    }
}
