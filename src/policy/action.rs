//! What an action of the repository asks for that only the operator can allow: Docker access and privileged
//! services. Checked when a change is created (its first action) and again before every step runs.

use super::{Feature, Policy, PolicyError, StepResources, Subject};
use crate::actions::{Action, DockerAccess};

impl Policy {
    /// `Ok` when `subject` may run `action` as its repository wrote it; else the first refusal, naming the
    /// setting that allows it.
    pub fn require_action(&self, subject: Subject<'_>, action: &Action) -> Result<(), PolicyError> {
        self.action_resources(subject, action)?;
        match action.docker {
            Some(DockerAccess::Socket) => self.require_for(subject, Feature::DockerSocket)?,
            Some(DockerAccess::Dind) => self.require_for(subject, Feature::DockerDind)?,
            None => {}
        }
        if let Some(name) = action
            .services
            .iter()
            .find_map(|(name, s)| s.privileged.then_some(name))
        {
            self.require_for(subject, Feature::PrivilegedService)
                .map_err(|e| match e {
                    PolicyError::Refused {
                        what,
                        project,
                        environment,
                        setting,
                        path,
                    } => PolicyError::Refused {
                        what: format!("{what} ({name:?})"),
                        project,
                        environment,
                        setting,
                        path,
                    },
                    PolicyError::RunStepRefused {
                        what,
                        setting,
                        path,
                    } => PolicyError::RunStepRefused {
                        what: format!("{what} ({name:?})"),
                        setting,
                        path,
                    },
                    other => other,
                })?;
        }
        Ok(())
    }
}

impl Policy {
    /// The limits `action`'s step container runs with: the operator's `[steps]` defaults, or what the action asks
    /// for up to the maximums; asking for more is an error naming the setting that raises it.
    pub fn action_resources(
        &self,
        subject: Subject<'_>,
        action: &Action,
    ) -> Result<StepResources, PolicyError> {
        let (project, environment) = match subject {
            Subject::Change {
                project,
                environment,
            } => (project, environment),
            Subject::RunStep => ("", ""),
        };
        self.resolve_resources(project, environment, &action.resource_request())
    }
}

#[cfg(test)]
mod tests {
    use crate::actions::Manifest;
    use crate::policy::{parse, Subject};
    use std::path::Path;

    fn action(json: &str) -> crate::actions::Action {
        let manifest = Manifest::parse(".opschain/actions.json", json.as_bytes()).unwrap();
        manifest
            .action(".opschain/actions.json", "it")
            .unwrap()
            .clone()
    }

    #[test]
    fn privileged_features_need_a_grant() {
        let demo = Subject::Change {
            project: "demo",
            environment: "dev",
        };
        let none = parse("", Path::new("/p.toml")).unwrap();
        let socket = action(r#"{"actions": {"it": {"run": "x", "docker": "socket"}}}"#);
        let dind = action(r#"{"actions": {"it": {"run": "x", "docker": "dind"}}}"#);
        let privileged = action(
            r#"{"actions": {"it": {"run": "x", "services": {"db": {"image": "x", "privileged": true}}}}}"#,
        );
        let plain =
            action(r#"{"actions": {"it": {"run": "x", "services": {"db": {"image": "x"}}}}}"#);
        assert!(none.require_action(demo, &plain).is_ok());
        assert!(none.require_action(Subject::RunStep, &plain).is_ok());
        assert!(none
            .require_action(demo, &socket)
            .unwrap_err()
            .to_string()
            .contains("add `docker_socket = true` to a [[grant]]"));
        assert!(none
            .require_action(demo, &dind)
            .unwrap_err()
            .to_string()
            .contains("`docker_dind = true`"));
        assert_eq!(
            none.require_action(demo, &privileged).unwrap_err().to_string(),
            "a privileged service (\"db\") is not allowed for project demo environment dev: add `privileged_services = true` to a [[grant]] for it in /p.toml"
        );
        assert!(none
            .require_action(Subject::RunStep, &privileged)
            .unwrap_err()
            .to_string()
            .contains("to [run_step]"));
        let all = parse(
            "[[grant]]\nproject = \"demo\"\ndocker_socket = true\ndocker_dind = true\nprivileged_services = true\n",
            Path::new("/p.toml"),
        )
        .unwrap();
        for a in [&socket, &dind, &privileged] {
            assert!(all.require_action(demo, a).is_ok());
            assert!(all.require_action(Subject::RunStep, a).is_err());
        }
    }
}
