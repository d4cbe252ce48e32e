//! The documents handed to a step: `step_context.json` (inside the container) and the values of
//! `step_context_env.json` (in the image build context). Pure.

use serde_json::{json, Value};

use crate::actions::Action;
use crate::store::{Change, Environment, Project};

/// Who and what a step runs for.
#[derive(Debug, Clone, Copy)]
pub struct StepIdentity<'a> {
    pub project: &'a Project,
    pub environment: &'a Environment,
    pub change: &'a Change,
    pub step_id: &'a str,
    pub action: &'a str,
}

/// The `context` section (seed 003's context values).
pub fn context_values(id: &StepIdentity) -> Value {
    json!({
        "project": {"code": id.project.code, "name": id.project.name},
        "environment": {"code": id.environment.code, "name": id.environment.name},
        "change": {
            "id": id.change.id,
            "action": id.change.action,
            "git_rev": id.change.git_rev,
            "git_sha": id.change.git_sha,
        },
        "step": {"id": id.step_id, "action": id.action},
        "user": {},
    })
}

/// `step_context.json`: the context, the project's and the environment's own properties (the agent diffs its
/// edits against exactly these), the repository's properties (merged first, never patched), and the action.
pub fn step_context(
    id: &StepIdentity,
    repository_properties: &Value,
    project_properties: &Value,
    environment_properties: &Value,
    action: &Action,
) -> Value {
    json!({
        "context": context_values(id),
        "repository": {"properties": repository_properties},
        "project": {"properties": project_properties},
        "environment": {"properties": environment_properties},
        "action": {"run": action.run, "env": action.env},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Command;
    use crate::events::ChangeState;

    #[test]
    fn step_context_has_the_seed_003_sections() {
        let project = Project {
            id: 1,
            code: "demo".into(),
            name: "Demo".into(),
            git_remote: None,
            git_credential: None,
            created_at: "t".into(),
        };
        let environment = Environment {
            id: 2,
            project_code: "demo".into(),
            code: "dev".into(),
            name: "Dev".into(),
            created_at: "t".into(),
        };
        let change = Change {
            id: "c1".into(),
            project: "demo".into(),
            environment: "dev".into(),
            action: "deploy".into(),
            git_rev: "main".into(),
            git_sha: "abc".into(),
            state: ChangeState::Running,
            reason: None,
            owner: None,
            cancel_requested: false,
            created_at: "t".into(),
            started_at: None,
            finished_at: None,
            attempt: 1,
        };
        let id = StepIdentity {
            project: &project,
            environment: &environment,
            change: &change,
            step_id: "s1",
            action: "build",
        };
        let action = Action {
            run: Some(Command::Shell("make".into())),
            ..Default::default()
        };
        let doc = step_context(
            &id,
            &json!({"r": 1}),
            &json!({"p": 1}),
            &json!({"e": 1}),
            &action,
        );
        assert_eq!(doc["context"]["change"]["git_sha"], "abc");
        assert_eq!(doc["context"]["step"]["action"], "build");
        assert_eq!(doc["project"]["properties"], json!({"p": 1}));
        assert_eq!(doc["environment"]["properties"], json!({"e": 1}));
        assert_eq!(doc["repository"]["properties"], json!({"r": 1}));
        assert_eq!(doc["action"]["run"], "make");
    }
}
