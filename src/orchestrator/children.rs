//! The dynamic children a step asks for in its `step_result.json` (`steps.children[].action` and
//! `steps.child_execution_strategy`), read and validated before anything of the step lands: each must name an
//! action of the manifest, not the step's own action nor one of its ancestors (that would recurse forever), and
//! the tree stays bounded in width and depth. Pure.

use serde_json::Value;

use crate::actions::{Manifest, RunAs};

/// At most this many dynamic children per step.
pub const MAX_CHILDREN: usize = 100;
/// At most this many levels of steps below a change's root.
pub const MAX_DEPTH: usize = 16;

/// The children a step's result asks for, and how they run (`None`: the action's own strategy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicChildren {
    pub actions: Vec<String>,
    pub strategy: Option<RunAs>,
}

/// Reads and validates a step result's children. `ancestors` are the actions from the root down to the step's
/// parent; `action` is the step's own.
pub fn dynamic_children(
    result: &Value,
    manifest: &Manifest,
    manifest_path: &str,
    action: &str,
    ancestors: &[String],
) -> Result<DynamicChildren, String> {
    let actions: Vec<String> = match result.pointer("/steps/children") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.get("action")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("steps.children entry {item} has no \"action\" string"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("steps.children must be a list, found {other}")),
    };
    let strategy = match result.pointer("/steps/child_execution_strategy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "parallel" => Some(RunAs::Parallel),
        Some(Value::String(s)) if s == "sequential" => Some(RunAs::Sequential),
        Some(other) => {
            return Err(format!(
            "steps.child_execution_strategy must be \"sequential\" or \"parallel\", found {other}"
        ))
        }
    };
    if actions.len() > MAX_CHILDREN {
        return Err(format!(
            "steps.children lists {} children; at most {MAX_CHILDREN} are allowed per step",
            actions.len()
        ));
    }
    // The step sits at depth ancestors.len(); its children one below.
    if !actions.is_empty() && ancestors.len() + 1 > MAX_DEPTH {
        return Err(format!(
            "steps.children would nest steps {} levels deep; at most {MAX_DEPTH} are allowed",
            ancestors.len() + 1
        ));
    }
    for child in &actions {
        manifest
            .action(manifest_path, child)
            .map_err(|e| format!("steps.children names an unknown action: {e}"))?;
        if child == action {
            return Err(format!(
                "steps.children names the step's own action {child:?}: it would run itself forever"
            ));
        }
        if ancestors.iter().any(|a| a == child) {
            return Err(format!(
                "steps.children names {child:?}, an action above this step ({}): it would recurse forever",
                ancestors.join(" > ")
            ));
        }
    }
    Ok(DynamicChildren { actions, strategy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> Manifest {
        Manifest::parse(
            "actions.json",
            json!({"actions": {"root": {"run": "r"}, "mid": {"run": "m"}, "leaf": {"run": "l"}}})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    fn children(
        result: Value,
        action: &str,
        ancestors: &[&str],
    ) -> Result<DynamicChildren, String> {
        let ancestors: Vec<String> = ancestors.iter().map(|a| a.to_string()).collect();
        dynamic_children(&result, &manifest(), "actions.json", action, &ancestors)
    }

    #[test]
    fn known_children_with_their_strategy_are_accepted() {
        let found = children(
            json!({"steps": {"children": [{"action": "leaf"}, {"action": "leaf"}],
                             "child_execution_strategy": "parallel"}}),
            "mid",
            &["root"],
        )
        .unwrap();
        assert_eq!(found.actions, ["leaf", "leaf"]);
        assert_eq!(found.strategy, Some(RunAs::Parallel));
        assert_eq!(
            children(json!({}), "mid", &[]).unwrap().actions,
            Vec::<String>::new()
        );
    }

    #[test]
    fn unknown_own_and_ancestor_actions_are_refused() {
        let unknown = children(
            json!({"steps": {"children": [{"action": "nope"}]}}),
            "mid",
            &[],
        );
        assert!(unknown.unwrap_err().contains("nope"));
        let own = children(
            json!({"steps": {"children": [{"action": "mid"}]}}),
            "mid",
            &["root"],
        );
        assert!(own.unwrap_err().contains("own action"));
        let ancestor = children(
            json!({"steps": {"children": [{"action": "root"}]}}),
            "mid",
            &["root"],
        );
        assert!(ancestor.unwrap_err().contains("above this step"));
    }

    #[test]
    fn too_many_children_and_too_deep_trees_are_refused() {
        let many: Vec<Value> = (0..=MAX_CHILDREN)
            .map(|_| json!({"action": "leaf"}))
            .collect();
        let wide = children(json!({"steps": {"children": many}}), "mid", &[]);
        assert!(wide.unwrap_err().contains("at most 100"));
        let deep: Vec<&str> = vec!["x"; MAX_DEPTH];
        let too_deep = children(
            json!({"steps": {"children": [{"action": "leaf"}]}}),
            "mid",
            &deep,
        );
        assert!(too_deep.unwrap_err().contains("levels deep"));
        // A leaf at the maximum depth that asks for nothing is fine.
        assert!(children(json!({}), "mid", &deep).is_ok());
    }

    #[test]
    fn malformed_children_are_refused_with_what_is_wrong() {
        assert!(children(json!({"steps": {"children": {}}}), "mid", &[])
            .unwrap_err()
            .contains("must be a list"));
        assert!(children(json!({"steps": {"children": [{}]}}), "mid", &[])
            .unwrap_err()
            .contains("no \"action\""));
        assert!(children(
            json!({"steps": {"child_execution_strategy": "both"}}),
            "mid",
            &[]
        )
        .unwrap_err()
        .contains("sequential"));
    }
}
