//! Applying a finished step's property patches: atomically for project and environment, based on the versions the
//! step started from, and refused when a parallel sibling already changed the same locations.

use serde::Serialize;
use serde_json::Value;

use crate::properties::{self, Patch};
use crate::store::{
    Landed, PropertiesOwner, PropertiesWrite, StepSettle, Store, StoreError, WrittenBy,
};

/// The project and environment patches of a `step_result.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPatches {
    pub project: Patch,
    pub environment: Patch,
}

/// Reads `project.properties_diff` and `environment.properties_diff` (absent means empty).
pub fn patches_from_result(result: &Value) -> Result<StepPatches, String> {
    let read = |scope: &str| -> Result<Patch, String> {
        match result.pointer(&format!("/{scope}/properties_diff")) {
            None | Some(Value::Null) => Ok(json_patch::Patch(vec![])),
            Some(diff) => serde_json::from_value(diff.clone())
                .map_err(|e| format!("{scope}.properties_diff is not an RFC 6902 patch: {e}")),
        }
    };
    Ok(StepPatches {
        project: read("project")?,
        environment: read("environment")?,
    })
}

/// Why a step's patch was refused, with everything needed to understand it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConflictReport {
    pub owner: String,
    pub base_version: i64,
    pub base: Value,
    /// What other steps applied since the base version, one patch per version.
    pub applied: Vec<Patch>,
    pub rejected: Patch,
    pub current_version: i64,
    pub current: Value,
    /// (location the rejected patch touches, location already changed).
    pub overlaps: Vec<(String, String)>,
}

impl std::fmt::Display for ConflictReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let overlaps: Vec<String> = self
            .overlaps
            .iter()
            .map(|(new, old)| format!("{new} (changed at {old})"))
            .collect();
        write!(
            f,
            "the step's patch of the {} properties conflicts with changes applied since version {}: {}\n{}",
            self.owner,
            self.base_version,
            overlaps.join(", "),
            serde_json::to_string_pretty(self).expect("reports serialise")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Conflict(Box<ConflictReport>),
    #[error("the step's patch of the {owner} properties does not apply: {source}")]
    DoesNotApply {
        owner: String,
        #[source]
        source: properties::PatchError,
    },
    #[error("the step's patch would make the {owner} properties invalid (nothing was applied): {source}")]
    Invalid {
        owner: String,
        #[source]
        source: properties::DocumentRuleError,
    },
    #[error("the step's patch changes `opschain.{key}` of the {owner} properties, which only a project admin may set (a repository never chooses its secrets): nothing was applied")]
    AdminOnly { owner: String, key: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often a write is re-based when other writers keep getting in first.
const ATTEMPTS: usize = 100;

/// Applies both patches in one transaction. `base_*` are the versions the step read when it started. Where a
/// document moved on since, the patch is re-based onto the current version if it touches nothing that changed,
/// and refused with a [`ConflictReport`] otherwise. With `settle`, the step's end lands in the same transaction
/// as its patches (even when it has none), and the answer says whether the step was still there to settle.
pub async fn apply_step_patches(
    store: &Store,
    project: (&PropertiesOwner, i64),
    environment: (&PropertiesOwner, i64),
    patches: &StepPatches,
    by: &WrittenBy,
    settle: Option<&StepSettle<'_>>,
) -> Result<Landed, ApplyError> {
    let scopes = [
        (project.0, project.1, &patches.project),
        (environment.0, environment.1, &patches.environment),
    ];
    for _ in 0..ATTEMPTS {
        let mut documents = Vec::new();
        for (owner, base_version, patch) in scopes {
            if patch.0.is_empty() {
                continue;
            }
            let current = store.properties(owner, None).await?;
            if current.version != base_version {
                check_conflict(store, owner, base_version, &current, patch).await?;
            }
            let document = properties::apply_patch(&current.document, patch).map_err(|source| {
                ApplyError::DoesNotApply {
                    owner: owner.to_string(),
                    source,
                }
            })?;
            // The same rules as a CLI/API write, and the secret lists stay the admins'.
            properties::validate_document(&document).map_err(|source| ApplyError::Invalid {
                owner: owner.to_string(),
                source,
            })?;
            properties::step_may_write(&current.document, &document).map_err(|key| {
                ApplyError::AdminOnly {
                    owner: owner.to_string(),
                    key,
                }
            })?;
            documents.push((owner, current.version, document));
        }
        if documents.is_empty() && settle.is_none() {
            return Ok(done());
        }
        let writes: Vec<PropertiesWrite> = documents
            .iter()
            .map(|(owner, version, document)| PropertiesWrite {
                owner,
                expected_version: *version,
                document,
            })
            .collect();
        let written = match settle {
            Some(settle) => store.settle_step(settle, &writes, by).await,
            None => store.write_properties(&writes, by).await.map(|_| done()),
        };
        match written {
            Ok(landed) => return Ok(landed),
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::VersionConflict {
        owner: project.0.to_string(),
        expected: project.1,
        current: -1,
    }
    .into())
}

/// Written, with no events to tell.
fn done() -> Landed {
    Landed::done(vec![])
}

async fn check_conflict(
    store: &Store,
    owner: &PropertiesOwner,
    base_version: i64,
    current: &crate::store::PropertiesVersion,
    patch: &Patch,
) -> Result<(), ApplyError> {
    let history = store.properties_history(owner).await?;
    let since: Vec<&Value> = history
        .iter()
        .filter(|v| v.version >= base_version && v.version <= current.version)
        .map(|v| &v.document)
        .collect();
    let Some(base) = since.first() else {
        return Ok(());
    };
    let applied: Vec<Patch> = since
        .windows(2)
        .map(|pair| properties::diff(pair[0], pair[1]))
        .collect();
    match properties::detect_conflict(base, &applied, patch) {
        None => Ok(()),
        Some(conflict) => Err(ApplyError::Conflict(Box::new(ConflictReport {
            owner: owner.to_string(),
            base_version,
            base: (*base).clone(),
            applied,
            rejected: patch.clone(),
            current_version: current.version,
            current: current.document.clone(),
            overlaps: conflict.overlaps,
        }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn setup() -> (tempfile::TempDir, Store, PropertiesOwner, PropertiesOwner) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let p = store.create_project("p", "P", None).await.unwrap();
        let e = store.create_environment("p", "e", "E").await.unwrap();
        ((dir), store, (&p).into(), (&e).into())
    }

    fn patches(project: Value, environment: Value) -> StepPatches {
        patches_from_result(&json!({
            "project": {"properties_diff": project},
            "environment": {"properties_diff": environment}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn both_patches_land_in_one_step() {
        let (_d, store, p, e) = setup().await;
        let step = patches(
            json!([{"op": "add", "path": "/a", "value": 1}]),
            json!([{"op": "add", "path": "/b", "value": 2}]),
        );
        apply_step_patches(&store, (&p, 1), (&e, 1), &step, &WrittenBy::Cli, None)
            .await
            .unwrap();
        assert_eq!(
            store.properties(&p, None).await.unwrap().document,
            json!({"a": 1})
        );
        assert_eq!(store.properties(&e, None).await.unwrap().version, 2);
    }

    #[tokio::test]
    async fn siblings_on_different_keys_both_apply_and_same_key_conflicts() {
        let (_d, store, p, e) = setup().await;
        let first = patches(json!([{"op": "add", "path": "/x", "value": 1}]), json!([]));
        let second = patches(json!([{"op": "add", "path": "/y", "value": 2}]), json!([]));
        let clash = patches(json!([{"op": "add", "path": "/x", "value": 3}]), json!([]));
        // All three started from version 1.
        apply_step_patches(&store, (&p, 1), (&e, 1), &first, &WrittenBy::Cli, None)
            .await
            .unwrap();
        apply_step_patches(&store, (&p, 1), (&e, 1), &second, &WrittenBy::Cli, None)
            .await
            .unwrap();
        assert_eq!(
            store.properties(&p, None).await.unwrap().document,
            json!({"x": 1, "y": 2})
        );
        let err = apply_step_patches(&store, (&p, 1), (&e, 1), &clash, &WrittenBy::Cli, None)
            .await
            .unwrap_err();
        let ApplyError::Conflict(report) = err else {
            panic!("{err}")
        };
        assert_eq!(report.base, json!({}));
        assert_eq!(report.applied.len(), 2);
        assert_eq!(report.current, json!({"x": 1, "y": 2}));
        assert_eq!(report.overlaps, [("/x".to_string(), "/x".to_string())]);
        assert!(report.to_string().contains("\"rejected\""));
        // Nothing of the refused step landed, in either document.
        assert_eq!(store.properties(&p, None).await.unwrap().version, 3);
    }

    #[tokio::test]
    async fn an_invalid_result_changes_nothing() {
        let (_d, store, p, e) = setup().await;
        let step = patches(
            json!([{"op": "add", "path": "/ok", "value": 1}]),
            json!([{"op": "add", "path": "/opschain", "value": {"env": {"N": 5}}}]),
        );
        let err = apply_step_patches(&store, (&p, 1), (&e, 1), &step, &WrittenBy::Cli, None)
            .await
            .unwrap_err();
        assert!(matches!(err, ApplyError::Invalid { .. }), "{err}");
        assert_eq!(store.properties(&p, None).await.unwrap().version, 1);
        assert!(
            patches_from_result(&json!({"project": {"properties_diff": {"op": "x"}}})).is_err()
        );
    }

    #[tokio::test]
    async fn a_step_patch_turning_properties_into_a_list_or_null_applies_nothing() {
        let (_d, store, p, e) = setup().await;
        for value in [json!([1, 2]), json!(null)] {
            let step = patches(
                json!([{"op": "add", "path": "/ok", "value": 1}]),
                json!([{"op": "replace", "path": "", "value": value}]),
            );
            let err = apply_step_patches(&store, (&p, 1), (&e, 1), &step, &WrittenBy::Cli, None)
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("properties must be a JSON object"),
                "{err}"
            );
            assert_eq!(store.properties(&p, None).await.unwrap().version, 1);
            assert_eq!(store.properties(&e, None).await.unwrap().version, 1);
        }
    }

    #[tokio::test]
    async fn a_step_patch_writing_runner_secrets_applies_nothing() {
        let (_d, store, p, e) = setup().await;
        for (patch, key) in [
            (
                json!([{"op": "add", "path": "/opschain", "value": {"env:runner_secrets": ["db"]}}]),
                "env:runner_secrets",
            ),
            (
                json!([{"op": "add", "path": "/opschain", "value": {"env:build_secrets": []}}]),
                "env:build_secrets",
            ),
            (
                json!([{"op": "replace", "path": "", "value": {"opschain": {"env:runner_secrets": ["x"]}}}]),
                "env:runner_secrets",
            ),
        ] {
            let step = patches(json!([{"op": "add", "path": "/ok", "value": 1}]), patch);
            let err = apply_step_patches(&store, (&p, 1), (&e, 1), &step, &WrittenBy::Cli, None)
                .await
                .unwrap_err();
            assert!(matches!(err, ApplyError::AdminOnly { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains(&format!("changes `opschain.{key}`")),
                "{err}"
            );
            assert!(err.to_string().ends_with("nothing was applied"), "{err}");
            assert_eq!(store.properties(&p, None).await.unwrap().version, 1);
            assert_eq!(store.properties(&e, None).await.unwrap().version, 1);
        }
    }
}
