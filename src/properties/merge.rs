//! The layered merge that builds the properties a step sees.

use serde_json::Value;

use super::opschain::strip_secret_lists;

/// Deep-merges `overlay` onto `base`: objects merge key by key, everything else (arrays included) is replaced.
pub fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// The property documents a step's view is built from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct Layers<'a> {
    /// `.opschain/properties.*` in the repository at the change's SHA.
    pub repository_project: Option<&'a Value>,
    /// `.opschain/environments/<env>.*` in the repository at the change's SHA.
    pub repository_environment: Option<&'a Value>,
    pub project: Option<&'a Value>,
    pub environment: Option<&'a Value>,
}

/// repository < repository environment < project < environment. Secret lists (`opschain.env:build_secrets`,
/// `opschain.env:runner_secrets`) are dropped from the repository layers: a commit must not choose which secrets a
/// step receives, only the people who manage the project and environment may.
pub fn layered_view(layers: &Layers) -> Value {
    let mut view = Value::Object(Default::default());
    for repo_layer in [layers.repository_project, layers.repository_environment]
        .into_iter()
        .flatten()
    {
        let mut layer = repo_layer.clone();
        strip_secret_lists(&mut layer);
        deep_merge(&mut view, &layer);
    }
    for layer in [layers.project, layers.environment].into_iter().flatten() {
        deep_merge(&mut view, layer);
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_merge_arrays_replace() {
        let mut a = json!({"o": {"x": 1, "l": [1, 2]}, "s": "a"});
        deep_merge(
            &mut a,
            &json!({"o": {"y": 2, "l": [3]}, "s": {"now": "object"}}),
        );
        assert_eq!(
            a,
            json!({"o": {"x": 1, "y": 2, "l": [3]}, "s": {"now": "object"}})
        );
    }

    #[test]
    fn layers_apply_in_precedence_order_and_repo_cannot_pick_secrets() {
        let repo = json!({"v": "repo", "r": 1, "opschain": {"env:build_secrets": ["evil"], "env": {"A": "repo"}}});
        let repo_env = json!({"v": "repo-env"});
        let project = json!({"v": "project", "p": 1});
        let env = json!({"v": "env", "opschain": {"env": {"B": "env"}}});
        let view = layered_view(&Layers {
            repository_project: Some(&repo),
            repository_environment: Some(&repo_env),
            project: Some(&project),
            environment: Some(&env),
        });
        assert_eq!(
            view,
            json!({"v": "env", "r": 1, "p": 1, "opschain": {"env": {"A": "repo", "B": "env"}}})
        );
    }
}
