//! The store contract: every case runs against both backends, SQLite (a fresh data directory) and PostgreSQL (a
//! fresh database on a throwaway cluster, see `support::postgres`). A backend that answers differently from the
//! other fails the case of its name.

mod support;

use std::future::Future;
use std::sync::Arc;

use runner::events::{ChangeState, Event, StepState};
use runner::executor::Stream;
use runner::logs::chunk::{self, ChunkLine};
use runner::store::{
    BaseImageSource, BatchEntry, ChangeFilter, Claim, ClaimScope, ClaimedStep, NewChange, NewStep,
    PropertiesOwner, PropertiesWrite, StepEnd, StepFinish, StepSettle, Store, StoreError,
    Transition, Verdict, WrittenBy,
};
use serde_json::json;

/// Runs `case` on a fresh store of each backend.
macro_rules! contract {
    ($name:ident, $case:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let home = tempfile::tempdir().unwrap();
                let store = Store::connect(home.path(), None).await.unwrap();
                assert_eq!(store.backend(), runner::store::Backend::Sqlite);
                run_case(store, $case).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if !support::postgres::postgres_available() {
                    return;
                }
                let url = support::postgres::shared().database();
                let home = tempfile::tempdir().unwrap();
                let store = Store::connect(home.path(), Some(&url)).await.unwrap();
                assert_eq!(store.backend(), runner::store::Backend::Postgres);
                run_case(store, $case).await;
            }
        }
    };
}

/// Direct access to a case's database, for what the store's API must never let happen.
enum Raw {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Raw {
    async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Raw::Sqlite(path) => {
                let pool =
                    sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
                let done = sqlx::query(sql).execute(&pool).await;
                pool.close().await;
                done?.rows_affected()
            }
            Raw::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                let done = sqlx::query(sql).execute(&pool).await;
                pool.close().await;
                done?.rows_affected()
            }
        })
    }
}

/// Runs `case` on a fresh store of each backend, with raw access to its database.
macro_rules! contract_raw {
    ($name:ident, $case:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let home = tempfile::tempdir().unwrap();
                let store = Store::connect(home.path(), None).await.unwrap();
                let raw = Raw::Sqlite(home.path().join("runner.db"));
                ($case)(store.clone(), raw).await;
                store.close().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if !support::postgres::postgres_available() {
                    return;
                }
                let url = support::postgres::shared().database();
                let home = tempfile::tempdir().unwrap();
                let store = Store::connect(home.path(), Some(&url)).await.unwrap();
                ($case)(store.clone(), Raw::Postgres(url)).await;
                store.close().await;
            }
        }
    };
}

async fn run_case<F, Fut>(store: Store, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    case(store.clone()).await;
    store.close().await;
}

async fn project_env(store: &Store) -> (runner::store::Project, runner::store::Environment) {
    let p = store.create_project("demo", "Demo", None).await.unwrap();
    let e = store
        .create_environment("demo", "dev", "Dev")
        .await
        .unwrap();
    (p, e)
}

/// The next ready step of `change` that `worker` may claim.
async fn claim(store: &Store, worker: &str, change: &str) -> Option<ClaimedStep> {
    store
        .claim_step(worker, ClaimScope::Change(change))
        .await
        .unwrap()
}

/// Children to record: (id, action), flags off.
fn kids(spec: &[(&str, &str)]) -> Vec<NewStep> {
    spec.iter()
        .map(|(id, action)| NewStep {
            id: (*id).to_owned(),
            action: (*action).to_owned(),
            ..Default::default()
        })
        .collect()
}

async fn new_change(store: &Store, id: &str, owner: &str) {
    let p = store.project("demo").await.unwrap();
    let e = store.environment("demo", "dev").await.unwrap();
    store
        .create_change(&NewChange {
            id,
            project_id: p.id,
            environment_id: e.id,
            action: "deploy",
            git_rev: "HEAD",
            git_sha: "abc123",
            root_step_id: &format!("{id}-root"),
            owner,
            labels: &[("team".to_owned(), "ops".to_owned())]
                .into_iter()
                .collect(),
        })
        .await
        .unwrap();
}

contract!(projects_and_environments, |store: Store| async move {
    let p = store
        .create_project("demo", "Demo", Some("/srv/git/demo"))
        .await
        .unwrap();
    assert_eq!(p.code, "demo");
    store.create_project("alpha", "Alpha", None).await.unwrap();
    let err = store
        .create_project("demo", "Again", None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyExists {
                what: "project",
                ..
            }
        ),
        "{err:?}"
    );
    let codes: Vec<String> = store
        .list_projects()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.code)
        .collect();
    assert_eq!(codes, ["alpha", "demo"]);
    assert_eq!(
        store.project("demo").await.unwrap().git_remote.as_deref(),
        Some("/srv/git/demo")
    );
    assert!(matches!(
        store.project("nope").await.unwrap_err(),
        StoreError::NotFound {
            what: "project",
            ..
        }
    ));
    let updated = store
        .set_git_remote("demo", "https://git.example.com/demo.git", Some("git-demo"))
        .await
        .unwrap();
    assert_eq!(updated.git_credential.as_deref(), Some("git-demo"));
    assert!(store.set_git_remote("nope", "x", None).await.is_err());

    store
        .create_environment("demo", "prod", "Prod")
        .await
        .unwrap();
    store
        .create_environment("demo", "dev", "Dev")
        .await
        .unwrap();
    store
        .create_environment("alpha", "dev", "Dev")
        .await
        .unwrap();
    let err = store
        .create_environment("demo", "dev", "Dev")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    assert!(matches!(
        store
            .create_environment("nope", "dev", "Dev")
            .await
            .unwrap_err(),
        StoreError::NotFound { .. }
    ));
    let envs: Vec<String> = store
        .list_environments("demo")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.code)
        .collect();
    assert_eq!(envs, ["dev", "prod"]);
    let dev = store.environment("alpha", "dev").await.unwrap();
    assert_eq!(dev.project_code, "alpha");
    assert!(matches!(
        store.environment("demo", "qa").await.unwrap_err(),
        StoreError::NotFound {
            what: "environment",
            ..
        }
    ));
});

contract!(
    properties_versions_and_conflicts,
    |store: Store| async move {
        let (p, e) = project_env(&store).await;
        let owner = PropertiesOwner::from(&p);
        let env_owner = PropertiesOwner::from(&e);
        let first = store.properties(&owner, None).await.unwrap();
        assert_eq!((first.version, first.document.clone()), (1, json!({})));
        let doc = json!({"a": {"b": [1, 2, "ü"]}, "n": 1.5});
        let written = store
            .write_properties(
                &[PropertiesWrite {
                    owner: &owner,
                    expected_version: 1,
                    document: &doc,
                }],
                &WrittenBy::Api,
            )
            .await
            .unwrap();
        assert_eq!(written[0].version, 2);
        let err = store
            .write_properties(
                &[PropertiesWrite {
                    owner: &owner,
                    expected_version: 1,
                    document: &json!({}),
                }],
                &WrittenBy::Cli,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::VersionConflict {
                    expected: 1,
                    current: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        // Two owners in one write: a conflict on the second leaves the first unwritten.
        let err = store
            .write_properties(
                &[
                    PropertiesWrite {
                        owner: &env_owner,
                        expected_version: 1,
                        document: &json!({"x": 1}),
                    },
                    PropertiesWrite {
                        owner: &owner,
                        expected_version: 1,
                        document: &json!({}),
                    },
                ],
                &WrittenBy::Cli,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::VersionConflict { .. }));
        assert_eq!(store.properties(&env_owner, None).await.unwrap().version, 1);

        let by = WrittenBy::Change {
            change_id: "c1".into(),
            step_id: "s1".into(),
        };
        store
            .write_properties(
                &[PropertiesWrite {
                    owner: &owner,
                    expected_version: 2,
                    document: &json!({"v": 3}),
                }],
                &by,
            )
            .await
            .unwrap();
        let history = store.properties_history(&owner).await.unwrap();
        assert_eq!(
            history.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(history[1].document, doc);
        assert_eq!(history[1].written_by, WrittenBy::Api);
        assert_eq!(history[2].written_by, by);
        assert_eq!(
            store.properties(&owner, Some(2)).await.unwrap().document,
            doc
        );
        assert!(matches!(
            store.properties(&owner, Some(9)).await.unwrap_err(),
            StoreError::NotFound { .. }
        ));
        let huge = json!({"x": "y".repeat(runner::properties::MAX_DOCUMENT_BYTES)});
        let err = store
            .write_properties(
                &[PropertiesWrite {
                    owner: &owner,
                    expected_version: 3,
                    document: &huge,
                }],
                &WrittenBy::Cli,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err:?}");
    }
);

contract!(
    concurrent_writers_on_one_version_one_wins,
    |store: Store| async move {
        let (p, _) = project_env(&store).await;
        let owner = Arc::new(PropertiesOwner::from(&p));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                let owner = owner.clone();
                tokio::spawn(async move {
                    let doc = json!({ "writer": i });
                    store
                        .write_properties(
                            &[PropertiesWrite {
                                owner: &owner,
                                expected_version: 1,
                                document: &doc,
                            }],
                            &WrittenBy::Cli,
                        )
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::VersionConflict { .. }) => {}
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(won, 1);
        assert_eq!(store.properties(&owner, None).await.unwrap().version, 2);
    }
);

contract!(changes_list_cancel_and_steps, |store: Store| async move {
    project_env(&store).await;
    store.create_project("other", "Other", None).await.unwrap();
    store
        .create_environment("other", "dev", "Dev")
        .await
        .unwrap();
    for id in ["c1", "c2", "c3"] {
        new_change(&store, id, "me").await;
    }
    let c1 = store.change("c1").await.unwrap();
    assert_eq!(
        (c1.state, c1.owner.as_deref(), c1.cancel_requested),
        (ChangeState::Pending, Some("me"), false)
    );
    assert!(matches!(
        store.change("zz").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    let all = store.list_changes(&ChangeFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c3", "c2", "c1"],
        "newest first"
    );
    let page = store
        .list_changes(&ChangeFilter {
            limit: 1,
            offset: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, "c2");
    let none = store
        .list_changes(&ChangeFilter {
            project: Some("other".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    let dev = store
        .list_changes(&ChangeFilter {
            project: Some("demo".into()),
            environment: Some("dev".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dev.len(), 3);

    store.request_cancel("c2").await.unwrap();
    assert!(store.change("c2").await.unwrap().cancel_requested);
    assert_eq!(
        store.queue_change("c2", "me").await.unwrap(),
        Transition::Refused,
        "a change whose cancel was requested never queues"
    );

    let steps = store.steps("c1").await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(
        (
            steps[0].id.as_str(),
            steps[0].state,
            steps[0].parent_id.clone()
        ),
        ("c1-root", StepState::Pending, None)
    );
    store
        .set_step_image("c1-root", "sha256:abc", true)
        .await
        .unwrap();
    store
        .finish_step(
            "c1-root",
            StepState::Error,
            &StepFinish {
                exit_code: Some(3),
                reason: Some("exit 3".into()),
                properties: Some(json!({"k": "v"})),
            },
        )
        .await
        .unwrap();
    let step = store.step("c1-root").await.unwrap();
    assert_eq!(step.image_id.as_deref(), Some("sha256:abc"));
    assert_eq!(step.image_cached, Some(true));
    assert_eq!(step.state, StepState::Error);
    assert_eq!(step.exit_code, Some(3));
    assert_eq!(step.properties, Some(json!({"k": "v"})));
    assert!(step.finished_at.is_some());
    assert!(matches!(
        store.step("nope").await.unwrap_err(),
        StoreError::NotFound { what: "step", .. }
    ));
    let unfinished: Vec<String> = store
        .unfinished_changes()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(unfinished, ["c1", "c2", "c3"]);
});

contract!(
    one_running_change_per_environment_in_creation_order,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        new_change(&store, "c2", "me").await;
        assert_eq!(
            store.queue_change("c2", "me").await.unwrap(),
            Transition::Done
        );
        assert_eq!(
            store.claim_environment("c2", "me").await.unwrap(),
            Claim::Blocked,
            "c1 was created first and still waits"
        );
        assert_eq!(
            store.queue_change("c1", "me").await.unwrap(),
            Transition::Done
        );
        assert_eq!(
            store.claim_environment("c1", "other").await.unwrap(),
            Claim::Lost,
            "only the owner claims"
        );
        assert_eq!(
            store.claim_environment("c1", "me").await.unwrap(),
            Claim::Claimed
        );
        assert_eq!(
            store.change("c1").await.unwrap().state,
            ChangeState::Running
        );
        assert_eq!(
            store.claim_environment("c2", "me").await.unwrap(),
            Claim::Blocked
        );
        assert_eq!(
            store
                .finish_change("c1", "other", ChangeState::Success, None)
                .await
                .unwrap(),
            Transition::Refused
        );
        assert_eq!(
            store
                .finish_change("c1", "me", ChangeState::Success, None)
                .await
                .unwrap(),
            Transition::Done
        );
        assert_eq!(
            store
                .finish_change("c1", "me", ChangeState::Error, Some("late"))
                .await
                .unwrap(),
            Transition::Refused,
            "an ended change stays ended"
        );
        assert_eq!(
            store.claim_environment("c2", "me").await.unwrap(),
            Claim::Claimed
        );
        store
            .finish_change("c2", "me", ChangeState::Error, Some("boom"))
            .await
            .unwrap();
        assert!(store.reset_change("c2", "again").await.unwrap().is_ok());
        let c2 = store.change("c2").await.unwrap();
        assert_eq!(
            (c2.state, c2.owner.as_deref(), c2.reason),
            (ChangeState::Pending, Some("again"), None)
        );
        let refused = store
            .reset_change("c1", "again")
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.state, ChangeState::Success);
    }
);

contract!(
    concurrent_claims_admit_one_change,
    |store: Store| async move {
        project_env(&store).await;
        // Changes created at the same millisecond by different owners: exactly one claim wins while it runs.
        for i in 0..6 {
            let id = format!("c{i}");
            new_change(&store, &id, &format!("o{i}")).await;
            store.queue_change(&id, &format!("o{i}")).await.unwrap();
        }
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .claim_environment(&format!("c{i}"), &format!("o{i}"))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut claimed = 0;
        for t in tasks {
            if t.await.unwrap() == Claim::Claimed {
                claimed += 1;
            }
        }
        assert_eq!(claimed, 1);
        let running = store
            .list_changes(&ChangeFilter::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.state == ChangeState::Running)
            .count();
        assert_eq!(running, 1);
    }
);

contract!(
    step_settle_lands_patches_and_children_together,
    |store: Store| async move {
        let (_, e) = project_env(&store).await;
        let env_owner = PropertiesOwner::from(&e);
        new_change(&store, "c1", "me").await;
        store.queue_change("c1", "me").await.unwrap();
        store.claim_environment("c1", "me").await.unwrap();
        assert!(
            claim(&store, "other", "c1").await.is_none(),
            "only the change's owner claims a local change's steps"
        );
        let root = claim(&store, "me", "c1").await.expect("the root is ready");
        assert_eq!(root.step.id, "c1-root");
        assert_eq!(root.step.worker.as_deref(), Some("me"));
        let children = kids(&[("c1-a", "build"), ("c1-b", "release")]);
        let doc = json!({"deployed": true});
        let settle = StepSettle {
            change_id: "c1",
            step_id: "c1-root",
            claim: &root.claim,
            exit_code: Some(0),
            properties: Some(json!({"seen": 1})),
            children: Some(("sequential", &children)),
        };
        let by = WrittenBy::Change {
            change_id: "c1".into(),
            step_id: "c1-root".into(),
        };
        // A stale base version: nothing lands, not even the step's end.
        let stale = store
            .settle_step(
                &settle,
                &[PropertiesWrite {
                    owner: &env_owner,
                    expected_version: 7,
                    document: &doc,
                }],
                &by,
            )
            .await
            .unwrap_err();
        assert!(matches!(stale, StoreError::VersionConflict { .. }));
        assert_eq!(store.steps("c1").await.unwrap().len(), 1);
        assert!(store
            .step("c1-root")
            .await
            .unwrap()
            .children_strategy
            .is_none());

        let writes = [PropertiesWrite {
            owner: &env_owner,
            expected_version: 1,
            document: &doc,
        }];
        assert_eq!(
            store
                .settle_step(
                    &StepSettle {
                        claim: "a stale claim",
                        ..settle.clone()
                    },
                    &writes,
                    &by
                )
                .await
                .unwrap()
                .transition,
            Transition::Refused
        );
        assert_eq!(store.properties(&env_owner, None).await.unwrap().version, 1);
        assert_eq!(
            store
                .settle_step(&settle, &writes, &by)
                .await
                .unwrap()
                .transition,
            Transition::Done
        );
        assert_eq!(
            store.properties(&env_owner, None).await.unwrap().document,
            doc
        );
        let steps = store.steps("c1").await.unwrap();
        assert_eq!(
            steps
                .iter()
                .map(|s| (s.id.as_str(), s.position))
                .collect::<Vec<_>>(),
            [("c1-root", 0), ("c1-a", 0), ("c1-b", 1)]
        );
        let root = &steps[0];
        assert_eq!(
            root.state,
            StepState::Running,
            "a parent runs until its children end"
        );
        assert_eq!(root.children_strategy.as_deref(), Some("sequential"));
        assert_eq!(root.properties, Some(json!({"seen": 1})));
        assert_eq!(steps[1].parent_id.as_deref(), Some("c1-root"));

        // A leaf settles to success; settling it twice is refused (no patch applied twice).
        let a = claim(&store, "me", "c1")
            .await
            .expect("the first child is ready");
        assert_eq!(
            (a.step.id.as_str(), a.environment_version),
            ("c1-a", 2),
            "a claim reads the property versions the step starts from"
        );
        let leaf = StepSettle {
            change_id: "c1",
            step_id: "c1-a",
            claim: &a.claim,
            exit_code: Some(0),
            properties: None,
            children: None,
        };
        assert_eq!(
            store.settle_step(&leaf, &[], &by).await.unwrap().transition,
            Transition::Done
        );
        assert_eq!(store.step("c1-a").await.unwrap().state, StepState::Success);
        assert_eq!(store.step("c1-b").await.unwrap().state, StepState::Ready);
        assert_eq!(
            store.settle_step(&leaf, &[], &by).await.unwrap().transition,
            Transition::Refused
        );
    }
);

contract!(
    a_retry_archives_the_ended_attempt_and_tags_events,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        assert_eq!(store.change("c1").await.unwrap().attempt, 1);
        let run = |store: Store| async move {
            store.queue_change("c1", "me").await.unwrap();
            store.claim_environment("c1", "me").await.unwrap();
            claim(&store, "me", "c1").await.expect("a step is ready")
        };
        let root = run(store.clone()).await;
        let children = kids(&[("c1-a", "build")]);
        let by = WrittenBy::Change {
            change_id: "c1".into(),
            step_id: "c1-root".into(),
        };
        let settle = StepSettle {
            change_id: "c1",
            step_id: "c1-root",
            claim: &root.claim,
            exit_code: Some(0),
            properties: None,
            children: Some(("sequential", &children)),
        };
        store.settle_step(&settle, &[], &by).await.unwrap();
        claim(&store, "me", "c1").await.expect("c1-a is ready");
        let failed = |reason: &str| StepFinish {
            exit_code: Some(3),
            reason: Some(reason.into()),
            properties: None,
        };
        store
            .finish_step("c1-a", StepState::Error, &failed("first failure"))
            .await
            .unwrap();
        let e1 = store
            .append_event(
                "c1",
                &Event::ChangeState {
                    state: ChangeState::Error,
                    reason: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(e1.attempt, 1);
        // Still running: a retry is refused and archives nothing.
        assert!(store.reset_change("c1", "me").await.unwrap().is_err());
        store
            .finish_change("c1", "me", ChangeState::Error, Some("attempt one failed"))
            .await
            .unwrap();
        assert!(store.reset_change("c1", "me").await.unwrap().is_ok());
        assert!(
            store.reset_change("c1", "me").await.unwrap().is_err(),
            "a second retry of a pending change is refused"
        );
        let change = store.change("c1").await.unwrap();
        assert_eq!(
            (change.attempt, change.state, change.reason),
            (2, ChangeState::Pending, None)
        );

        // The retry resumes below the root, whose own work succeeded: c1-a runs again.
        let again = run(store.clone()).await;
        assert_eq!(again.step.id, "c1-a");
        assert_eq!(store.step("c1-a").await.unwrap().attempt, 2);
        store
            .finish_step("c1-a", StepState::Error, &failed("second failure"))
            .await
            .unwrap();
        let e2 = store
            .append_event(
                "c1",
                &Event::ChangeState {
                    state: ChangeState::Error,
                    reason: None,
                },
            )
            .await
            .unwrap();
        // Between them, only the claim's `running` event.
        assert_eq!(again.events[0].seq, e1.seq + 1);
        assert_eq!((e2.seq, e2.attempt), (e1.seq + 2, 2));

        let first = store.steps_in_attempt("c1", 1).await.unwrap();
        assert_eq!(
            first
                .iter()
                .map(|s| (s.id.as_str(), s.state, s.reason.as_deref(), s.attempt))
                .collect::<Vec<_>>(),
            [
                ("c1-root", StepState::Running, None, 1),
                ("c1-a", StepState::Error, Some("first failure"), 1)
            ]
        );
        let a2 = store.step_in_attempt("c1-a", 0).await.unwrap();
        assert_eq!(
            (a2.reason.as_deref(), a2.attempt),
            (Some("second failure"), 2)
        );
        assert_eq!(
            store
                .step_in_attempt("c1-a", 1)
                .await
                .unwrap()
                .reason
                .as_deref(),
            Some("first failure")
        );
        let old = store.change_in_attempt("c1", 1).await.unwrap();
        assert_eq!(
            (old.attempt, old.state, old.reason.as_deref()),
            (1, ChangeState::Error, Some("attempt one failed"))
        );
        assert!(matches!(
            store.change_in_attempt("c1", 3).await.unwrap_err(),
            StoreError::NotFound {
                what: "attempt",
                ..
            }
        ));
        let events = store.events_after("c1", 0).await.unwrap();
        // Attempt 1: the root's and c1-a's claims, its end; attempt 2: c1-a's claim, its end.
        assert_eq!(
            events
                .iter()
                .map(|e| (e.seq, e.attempt))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
        );
    }
);

contract!(
    events_are_numbered_without_gaps_under_concurrency,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        let first = store
            .append_event(
                "c1",
                &Event::ChangeState {
                    state: ChangeState::Queued,
                    reason: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(first.seq, 1);
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        store
                            .append_event(
                                "c1",
                                &Event::Phase {
                                    step_id: format!("t{t}"),
                                    phase: runner::events::Phase::BuildStarted,
                                    message: format!("{i}"),
                                },
                            )
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let events = store.events_after("c1", 0).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=41).collect::<Vec<_>>()
        );
        // Each writer's events keep their order.
        for t in 0..4 {
            let mine: Vec<String> = events
                .iter()
                .filter_map(|e| match &e.event {
                    Event::Phase {
                        step_id, message, ..
                    } if *step_id == format!("t{t}") => Some(message.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(mine, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        }
        assert_eq!(store.last_seq("c1").await.unwrap(), 41);
        assert_eq!(store.events_after("c1", 40).await.unwrap().len(), 1);
    }
);

contract!(
    log_chunks_interleave_with_events_and_prune,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        let lines: Vec<ChunkLine> = (0..5)
            .map(|i| ChunkLine {
                step_id: "c1-root".into(),
                stream: Stream::Stdout,
                at_ms: 1_700_000_000_000 + i,
                line: format!("line {i} ✓"),
            })
            .collect();
        let encoded = chunk::encode(&lines);
        let text_bytes: i64 = lines.iter().map(|l| l.line.len() as i64 + 1).sum();
        let first = store
            .append_batch(
                "c1",
                &[
                    BatchEntry::Event {
                        event: Event::ChangeState {
                            state: ChangeState::Running,
                            reason: None,
                        },
                        at: "2026-01-01T00:00:00.000Z".into(),
                    },
                    BatchEntry::Lines {
                        count: 5,
                        first_at: lines[0].at_ms,
                        last_at: lines[4].at_ms,
                        text_bytes,
                        chunk: encoded,
                    },
                    BatchEntry::Event {
                        event: Event::ChangeState {
                            state: ChangeState::Success,
                            reason: None,
                        },
                        at: "2026-01-01T00:00:01.000Z".into(),
                    },
                ],
            )
            .await
            .unwrap();
        assert_eq!(first, 1);
        let all = store.events_after("c1", 0).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        assert!(matches!(&all[3].event, Event::Log { line, .. } if line == "line 2 ✓"));
        assert!(matches!(
            all[6].event,
            Event::ChangeState {
                state: ChangeState::Success,
                ..
            }
        ));
        let middle = store.events_between("c1", 2, Some(4)).await.unwrap();
        assert_eq!(middle.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(store.last_seq("c1").await.unwrap(), 7);
        let next = store
            .append_event(
                "c1",
                &Event::ChangeState {
                    state: ChangeState::Success,
                    reason: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(next.seq, 8);

        // Not finished: nothing to prune. Finished: its lines go, its other events stay.
        let nothing = store.prune_logs("9999-01-01T00:00:00.000Z").await.unwrap();
        assert_eq!(nothing.chunks, 0);
        store.queue_change("c1", "me").await.unwrap();
        store
            .finish_change("c1", "me", ChangeState::Success, None)
            .await
            .unwrap();
        let pruned = store.prune_logs("9999-01-01T00:00:00.000Z").await.unwrap();
        assert_eq!((pruned.changes, pruned.chunks), (1, 1));
        assert_eq!(pruned.text_bytes, text_bytes as u64);
        let left = store.events_after("c1", 0).await.unwrap();
        assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 7, 8]);
    }
);

contract!(leases_and_reaping, |store: Store| async move {
    project_env(&store).await;
    store.renew_lease("alive", "h1", 11, 1_000).await.unwrap();
    store.renew_lease("alive", "h2", 12, 2_000).await.unwrap();
    store.renew_lease("dead", "h1", 13, 5).await.unwrap();
    let mut leases = store.leases().await.unwrap();
    leases.sort_by(|a, b| a.owner.cmp(&b.owner));
    assert_eq!(
        leases
            .iter()
            .map(|l| (l.owner.as_str(), l.host.as_str(), l.pid, l.expires_at))
            .collect::<Vec<_>>(),
        [("alive", "h2", 12, 2_000), ("dead", "h1", 13, 5)]
    );
    new_change(&store, "c1", "dead").await;
    new_change(&store, "c2", "alive").await;
    store.queue_change("c1", "dead").await.unwrap();
    store.claim_environment("c1", "dead").await.unwrap();
    claim(&store, "dead", "c1")
        .await
        .expect("the root is ready");
    let reaped = store
        .reap_changes(|change, steps, leases| {
            let owner = change.owner.as_deref()?;
            let lease = leases.iter().find(|l| l.owner == owner)?;
            (lease.expires_at < 100).then(|| Verdict {
                state: ChangeState::Error,
                reason: "worker lost".into(),
                steps: steps
                    .iter()
                    .filter(|s| s.state == StepState::Running)
                    .map(|s| (s.clone(), StepState::Error, Some("worker lost".into())))
                    .collect(),
            })
        })
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].id, "c1");
    assert_eq!(reaped[0].events.len(), 2);
    // After the claim's `running` event (1).
    assert_eq!(
        reaped[0].events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [2, 3]
    );
    let c1 = store.change("c1").await.unwrap();
    assert_eq!(
        (c1.state, c1.reason.as_deref()),
        (ChangeState::Error, Some("worker lost"))
    );
    assert_eq!(store.step("c1-root").await.unwrap().state, StepState::Error);
    assert_eq!(
        store.change("c2").await.unwrap().state,
        ChangeState::Pending
    );
    store.drop_lease("dead").await.unwrap();
    assert_eq!(store.leases().await.unwrap().len(), 1);
});

contract!(base_image_settings, |store: Store| async move {
    let (p, e) = project_env(&store).await;
    let (po, eo) = (PropertiesOwner::from(&p), PropertiesOwner::from(&e));
    let operator = store.base_image_for("demo", "dev").await.unwrap();
    assert_eq!(
        (operator.image, operator.source),
        (None, BaseImageSource::Operator)
    );
    store
        .set_base_image(&po, Some("team/base:1"))
        .await
        .unwrap();
    let from_project = store.base_image_for("demo", "dev").await.unwrap();
    assert_eq!(from_project.source, BaseImageSource::Project);
    store
        .set_base_image(&eo, Some("team/base:2"))
        .await
        .unwrap();
    store
        .set_base_image(&eo, Some("team/base:3"))
        .await
        .unwrap();
    let from_env = store.base_image_for("demo", "dev").await.unwrap();
    assert_eq!(
        (from_env.image.as_deref(), from_env.source),
        (Some("team/base:3"), BaseImageSource::Environment)
    );
    let mut used = store.base_images_in_use().await.unwrap();
    used.sort();
    assert_eq!(used, ["team/base:1", "team/base:3"]);
    store.set_base_image(&eo, None).await.unwrap();
    assert_eq!(store.own_base_image(&eo).await.unwrap(), None);
    assert_eq!(
        store.base_image_for("demo", "dev").await.unwrap().source,
        BaseImageSource::Project
    );
    assert!(store.base_image_for("demo", "qa").await.is_err());
});

contract!(web_reads, |store: Store| async move {
    use runner::store::WebChangeFilter;
    let (_, e) = project_env(&store).await;
    store.ping().await.unwrap();
    for id in ["c1", "c2", "c3"] {
        new_change(&store, id, "me").await;
    }
    store.queue_change("c1", "me").await.unwrap();
    store.claim_environment("c1", "me").await.unwrap();
    let root = claim(&store, "me", "c1").await.expect("the root is ready");
    assert_eq!(store.running_containers().await.unwrap(), 1);
    let running = store
        .web_changes(&WebChangeFilter {
            state: Some(ChangeState::Running),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        running.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c1"]
    );
    let page = store
        .web_changes(&WebChangeFilter {
            project: Some("demo".into()),
            environment: Some("dev".into()),
            limit: 2,
            offset: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let mut counts = store.change_counts().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        counts,
        [(ChangeState::Pending, 2), (ChangeState::Running, 1)]
    );
    let owner = PropertiesOwner::from(&e);
    let settle = StepSettle {
        change_id: "c1",
        step_id: "c1-root",
        claim: &root.claim,
        exit_code: Some(0),
        properties: None,
        children: None,
    };
    let by = WrittenBy::Change {
        change_id: "c1".into(),
        step_id: "c1-root".into(),
    };
    let doc = json!({"x": 1});
    store
        .settle_step(
            &settle,
            &[PropertiesWrite {
                owner: &owner,
                expected_version: 1,
                document: &doc,
            }],
            &by,
        )
        .await
        .unwrap();
    let written = store.versions_written_by("c1-root").await.unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(
        (written[0].owner_kind.as_str(), written[0].version),
        ("environment", 2)
    );
});

contract!(
    api_queries_labels_and_request_ids,
    |store: Store| async move {
        use runner::store::{ChangeQuery, Keyset, RequestClaim};
        project_env(&store).await;
        for id in ["c1", "c2", "c3"] {
            new_change(&store, id, "me").await;
        }
        let labels = store.change_labels(&["c1".to_owned()]).await.unwrap();
        assert_eq!(labels["c1"].get("team").map(String::as_str), Some("ops"));
        let query = ChangeQuery {
            project: Some("demo".into()),
            states: vec![ChangeState::Pending],
            labels: vec![("team".into(), "ops".into())],
            oldest_first: true,
            ..Default::default()
        };
        let first = store.query_changes(&query, None, 2).await.unwrap();
        assert_eq!(
            first.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["c1", "c2"]
        );
        let last = &first[1];
        let rest = store
            .query_changes(
                &query,
                Some(&Keyset {
                    created_at: last.created_at.clone(),
                    id: last.id.clone(),
                }),
                2,
            )
            .await
            .unwrap();
        assert_eq!(
            rest.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["c3"]
        );

        assert_eq!(
            store
                .claim_request("r1", "CreateChange", "f1")
                .await
                .unwrap(),
            RequestClaim::New
        );
        assert_eq!(
            store
                .claim_request("r1", "CreateChange", "f1")
                .await
                .unwrap(),
            RequestClaim::InProgress
        );
        store
            .complete_request("r1", b"\x00\x01answer")
            .await
            .unwrap();
        assert_eq!(
            store
                .claim_request("r1", "CreateChange", "f1")
                .await
                .unwrap(),
            RequestClaim::Done(b"\x00\x01answer".to_vec())
        );
        assert!(matches!(
            store
                .claim_request("r1", "CreateChange", "f2")
                .await
                .unwrap(),
            RequestClaim::Mismatch { .. }
        ));
        store
            .claim_request("r2", "CancelChange", "f")
            .await
            .unwrap();
        store.release_request("r2").await.unwrap();
        assert_eq!(
            store
                .claim_request("r2", "CancelChange", "f")
                .await
                .unwrap(),
            RequestClaim::New
        );
    }
);

contract_raw!(
    the_database_refuses_a_second_running_change,
    |store: Store, raw: Raw| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        new_change(&store, "c2", "me").await;
        store.queue_change("c1", "me").await.unwrap();
        assert_eq!(
            store.claim_environment("c1", "me").await.unwrap(),
            Claim::Claimed
        );
        // A writer that skips the store's rules (another version of the runner, a hand-made UPDATE) is refused by
        // the database itself.
        let err = raw
            .execute("UPDATE changes SET state = 'running' WHERE id = 'c2'")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, sqlx::Error::Database(db) if db.is_unique_violation()),
            "{err:?}"
        );
        // Another environment is not affected.
        store
            .create_environment("demo", "prod", "Prod")
            .await
            .unwrap();
        let e = store.environment("demo", "prod").await.unwrap();
        let p = store.project("demo").await.unwrap();
        store
            .create_change(&NewChange {
                id: "p1",
                project_id: p.id,
                environment_id: e.id,
                action: "deploy",
                git_rev: "HEAD",
                git_sha: "abc",
                root_step_id: "p1-root",
                owner: "me",
                labels: &Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(
            raw.execute("UPDATE changes SET state = 'running' WHERE id = 'p1'")
                .await
                .unwrap(),
            1
        );
    }
);

contract!(
    event_numbers_are_per_change_and_need_the_change,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "me").await;
        new_change(&store, "c2", "me").await;
        let event = Event::ChangeState {
            state: ChangeState::Pending,
            reason: None,
        };
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                let event = event.clone();
                tokio::spawn(async move {
                    let id = if i % 2 == 0 { "c1" } else { "c2" };
                    store.append_event(id, &event).await.unwrap().seq
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for id in ["c1", "c2"] {
            let seqs: Vec<i64> = store
                .events_after(id, 0)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "{id}");
            assert_eq!(store.last_seq(id).await.unwrap(), 10);
        }
        assert_eq!(store.last_seq("nope").await.unwrap(), 0);
        let err = store.append_event("nope", &event).await.unwrap_err();
        assert!(
            matches!(err, StoreError::NotFound { what: "change", .. }),
            "{err:?}"
        );
    }
);

contract!(step_runs, |store: Store| async move {
    use runner::events::Phase;
    use runner::store::{NewStepRun, StepRunEnd, StepRunOutcome};
    let labels = [("batch".to_owned(), "b1".to_owned())]
        .into_iter()
        .collect();
    let new = NewStepRun {
        id: "run-1",
        owner: "owner-a",
        fingerprint: "f1",
        git_remote: "https://git.example.com/a.git",
        git_rev: "main",
        action: "a",
        labels: &labels,
    };
    let run = store.create_step_run(&new).await.unwrap().unwrap();
    assert!(!run.ended);
    assert_eq!(run.labels, labels);
    // The id is taken: the existing run comes back.
    let again = store.create_step_run(&new).await.unwrap().unwrap_err();
    assert_eq!(again.fingerprint, "f1");
    for n in 0..3 {
        let stored = store
            .append_step_run_event(
                "run-1",
                &Event::Phase {
                    step_id: "s".into(),
                    phase: Phase::RunStarted,
                    message: format!("m{n}"),
                },
            )
            .await
            .unwrap();
        assert_eq!(stored.seq, n + 1);
    }
    assert_eq!(store.step_run_last_seq("run-1").await.unwrap(), 3);
    let after = store.step_run_events_after("run-1", 1, 10).await.unwrap();
    assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    store.request_step_run_cancel("run-1").await.unwrap();
    assert!(store.step_run("run-1").await.unwrap().cancel_requested);
    let end = StepRunEnd {
        outcome: StepRunOutcome::Cancelled,
        result: None,
        error: Some((1, "CANCELLED".into(), "stopped".into())),
        duration_ms: 1500,
    };
    assert!(store.end_step_run("run-1", &end).await.unwrap());
    assert!(
        !store.end_step_run("run-1", &end).await.unwrap(),
        "ends once"
    );
    let ended = store.step_run("run-1").await.unwrap();
    assert!(ended.ended);
    assert_eq!(ended.outcome, Some(StepRunOutcome::Cancelled));
    assert_eq!(ended.error, Some((1, "CANCELLED".into(), "stopped".into())));
    assert_eq!(ended.duration_ms, Some(1500));
    assert!(matches!(
        store.step_run("nope").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
});

contract!(
    leases_expire_by_the_database_clock,
    |store: Store| async move {
        let before = store.clock_ms().await.unwrap();
        let local = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // The database here runs on this machine: its clock and ours agree to within a few seconds.
        assert!(
            (before - local).abs() < 5_000,
            "db {before} vs local {local}"
        );
        store
            .renew_lease_for("w1", "h1", 1, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        let after = store.clock_ms().await.unwrap();
        assert!(after >= before);
        let lease = store.leases().await.unwrap().pop().unwrap();
        assert!(
            lease.expires_at >= before + 30_000 && lease.expires_at <= after + 30_000,
            "{lease:?} not 30 s after [{before}, {after}]"
        );
        // Renewal moves the expiry; a zero time-to-live has run out by the database's next reading.
        store
            .renew_lease_for("w1", "h2", 2, std::time::Duration::ZERO)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let lease = store.leases().await.unwrap().pop().unwrap();
        assert_eq!((lease.host.as_str(), lease.pid), ("h2", 2));
        assert!(lease.expires_at < store.clock_ms().await.unwrap());
    }
);

contract!(project_admin, |store: Store| async move {
    project_env(&store).await;
    assert_eq!(
        store.rename_project("demo", "Renamed").await.unwrap().name,
        "Renamed"
    );
    assert_eq!(
        store
            .rename_environment("demo", "dev", "Development")
            .await
            .unwrap()
            .name,
        "Development"
    );
    assert!(matches!(
        store.delete_project("demo").await.unwrap_err(),
        StoreError::InUse { .. }
    ));
    new_change(&store, "c1", "owner").await;
    assert!(matches!(
        store.delete_environment("demo", "dev").await.unwrap_err(),
        StoreError::InUse { .. }
    ));
    store
        .create_environment("demo", "tmp", "Tmp")
        .await
        .unwrap();
    store.delete_environment("demo", "tmp").await.unwrap();
    assert!(matches!(
        store.environment("demo", "tmp").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    store.create_project("gone", "Gone", None).await.unwrap();
    store.delete_project("gone").await.unwrap();
    assert!(matches!(
        store.project("gone").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
});

contract!(
    fleet_changes_start_once_in_their_environments_turn,
    |store: Store| async move {
        project_env(&store).await;
        // Created with no owner: the fleet's queue.
        new_change(&store, "c1", "").await;
        new_change(&store, "c2", "").await;
        assert_eq!(store.change("c1").await.unwrap().owner, None);
        // Two workers at once: one starts c1, the other finds nothing (c2 waits for c1).
        let (a, b) = tokio::join!(store.start_fleet_change(), store.start_fleet_change());
        let started: Vec<String> = [a.unwrap(), b.unwrap()]
            .into_iter()
            .flatten()
            .map(|s| s.id)
            .collect();
        assert_eq!(started, ["c1"]);
        let c1 = store.change("c1").await.unwrap();
        assert_eq!((c1.state, c1.owner), (ChangeState::Running, None));
        assert_eq!(store.step("c1-root").await.unwrap().state, StepState::Ready);
        // c2 waits for c1: no worker starts it yet.
        assert!(store.start_fleet_change().await.unwrap().is_none());
        // Any worker claims the fleet change's step; a local claim of it is refused.
        assert!(claim(&store, "w1", "c1").await.is_none());
        let root = store
            .claim_step("w2", ClaimScope::Any)
            .await
            .unwrap()
            .expect("c1's root is ready for any worker");
        assert_eq!(root.step.worker.as_deref(), Some("w2"));
        let by = WrittenBy::Change {
            change_id: "c1".into(),
            step_id: "c1-root".into(),
        };
        let landed = store
            .settle_step(
                &StepSettle {
                    change_id: "c1",
                    step_id: "c1-root",
                    claim: &root.claim,
                    exit_code: Some(0),
                    properties: None,
                    children: None,
                },
                &[],
                &by,
            )
            .await
            .unwrap();
        // The root's end is the change's end, in the same transaction: the environment is free for c2.
        assert!(landed.events.iter().any(|r| matches!(
            r.event,
            Event::ChangeState {
                state: ChangeState::Success,
                ..
            }
        )));
        assert_eq!(
            store.change("c1").await.unwrap().state,
            ChangeState::Success
        );
        assert_eq!(
            store
                .start_fleet_change()
                .await
                .unwrap()
                .map(|s| s.id)
                .as_deref(),
            Some("c2")
        );
        // A cancelled queued change is nobody's to run.
        new_change(&store, "c3", "").await;
        store.request_cancel("c3").await.unwrap();
        store.request_cancel("c2").await.unwrap();
        assert!(store.start_fleet_change().await.unwrap().is_none());
        // c2's cancel ended its ready root, and with it the change.
        assert_eq!(
            store.change("c2").await.unwrap().state,
            ChangeState::Cancelled
        );
    }
);

/// A fleet change `id` whose root recorded `children` (`strategy`), the children ready.
async fn fleet_tree(store: &Store, id: &str, strategy: &str, children: &[(&str, &str)]) {
    new_change(store, id, "").await;
    assert_eq!(
        store
            .start_fleet_change()
            .await
            .unwrap()
            .map(|s| s.id)
            .as_deref(),
        Some(id)
    );
    let root = store
        .claim_step("w0", ClaimScope::Any)
        .await
        .unwrap()
        .unwrap();
    let kids = kids(children);
    let landed = store
        .settle_step(
            &StepSettle {
                change_id: id,
                step_id: &root.step.id,
                claim: &root.claim,
                exit_code: Some(0),
                properties: None,
                children: Some((strategy, &kids)),
            },
            &[],
            &WrittenBy::Change {
                change_id: id.into(),
                step_id: root.step.id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(landed.transition, Transition::Done);
}

contract!(
    two_claimers_never_get_the_same_step,
    |store: Store| async move {
        project_env(&store).await;
        let children: Vec<(String, String)> = (0..12)
            .map(|i| (format!("k{i}"), "build".to_owned()))
            .collect();
        let spec: Vec<(&str, &str)> = children
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        fleet_tree(&store, "c1", "parallel", &spec).await;
        let claimers = (0..4).map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(c) = store
                    .claim_step(&format!("w{w}"), ClaimScope::Any)
                    .await
                    .unwrap()
                {
                    got.push(c.step.id);
                }
                got
            })
        });
        let mut all: Vec<String> = Vec::new();
        for claimer in claimers.collect::<Vec<_>>() {
            all.extend(claimer.await.unwrap());
        }
        all.sort();
        let mut expected: Vec<String> = children.iter().map(|(id, _)| id.clone()).collect();
        expected.sort();
        assert_eq!(all, expected, "each ready step claimed exactly once");
    }
);

contract!(a_stale_claim_token_is_refused, |store: Store| async move {
    project_env(&store).await;
    fleet_tree(
        &store,
        "c1",
        "sequential",
        &[("a", "build"), ("b", "build")],
    )
    .await;
    let a = store
        .claim_step("w1", ClaimScope::Any)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.step.id, "a");
    // w1's lease ran out: the reaper re-queues nothing here (no opt-in) and fails the step naming w1.
    let events = store
        .reap_lost_steps(|step, _| {
            (step.worker.as_deref() == Some("w1")).then(|| "worker w1 was lost".to_owned())
        })
        .await
        .unwrap();
    assert!(!events.is_empty());
    let step = store.step("a").await.unwrap();
    assert_eq!(
        (step.state, step.reason.as_deref()),
        (StepState::Error, Some("worker w1 was lost"))
    );
    // The lost worker comes back and tries to land its step: refused, nothing written.
    let end = store
        .end_step(&StepEnd {
            change_id: "c1",
            step_id: "a",
            claim: &a.claim,
            state: StepState::Cancelled,
            reason: Some("stopped".into()),
            exit_code: None,
        })
        .await
        .unwrap();
    assert_eq!(end.transition, Transition::Refused);
    assert_eq!(store.step("a").await.unwrap().state, StepState::Error);
    // The tree moved on as a failure says: b aborted, the change ended in error.
    assert_eq!(store.step("b").await.unwrap().state, StepState::Aborted);
    let change = store.change("c1").await.unwrap();
    assert_eq!(
        (change.state, change.reason.as_deref()),
        (ChangeState::Error, Some("worker w1 was lost"))
    );
});

contract!(
    a_lost_step_that_opts_in_runs_again,
    |store: Store| async move {
        project_env(&store).await;
        new_change(&store, "c1", "").await;
        store.start_fleet_change().await.unwrap().unwrap();
        let kids = vec![NewStep {
            id: "a".into(),
            action: "build".into(),
            ignore_failure: false,
            retry_on_worker_loss: true,
        }];
        let root = store
            .claim_step("w0", ClaimScope::Any)
            .await
            .unwrap()
            .unwrap();
        let by = WrittenBy::Change {
            change_id: "c1".into(),
            step_id: "c1-root".into(),
        };
        store
            .settle_step(
                &StepSettle {
                    change_id: "c1",
                    step_id: "c1-root",
                    claim: &root.claim,
                    exit_code: Some(0),
                    properties: None,
                    children: Some(("sequential", &kids)),
                },
                &[],
                &by,
            )
            .await
            .unwrap();
        let mut claims = Vec::new();
        for round in 0..4 {
            let a = store
                .claim_step(&format!("w{round}"), ClaimScope::Any)
                .await
                .unwrap()
                .expect("the lost step is ready again");
            assert_eq!(a.step.id, "a");
            claims.push(a.claim);
            store
                .reap_lost_steps(|step, _| step.worker.is_some().then(|| "lost".to_owned()))
                .await
                .unwrap();
        }
        // Three re-runs, then the fourth loss fails it.
        let a = store.step("a").await.unwrap();
        assert_eq!(a.state, StepState::Error);
        assert!(a.reason.unwrap().contains("already run again 3 times"));
        let unique: std::collections::HashSet<_> = claims.iter().collect();
        assert_eq!(unique.len(), 4, "every claim has a fresh token");
    }
);

contract!(
    parallel_siblings_settled_concurrently_end_the_parent_once,
    |store: Store| async move {
        project_env(&store).await;
        let spec: Vec<(String, String)> = (0..6)
            .map(|i| (format!("p{i}"), "build".to_owned()))
            .collect();
        let spec: Vec<(&str, &str)> = spec.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        fleet_tree(&store, "c1", "parallel", &spec).await;
        let mut claimed = Vec::new();
        while let Some(c) = store.claim_step("w1", ClaimScope::Any).await.unwrap() {
            claimed.push(c);
        }
        assert_eq!(claimed.len(), 6);
        let settles = claimed.into_iter().map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .settle_step(
                        &StepSettle {
                            change_id: "c1",
                            step_id: &c.step.id,
                            claim: &c.claim,
                            exit_code: Some(0),
                            properties: None,
                            children: None,
                        },
                        &[],
                        &WrittenBy::Change {
                            change_id: "c1".into(),
                            step_id: c.step.id.clone(),
                        },
                    )
                    .await
                    .unwrap()
            })
        });
        let mut ends = 0;
        for settle in settles.collect::<Vec<_>>() {
            let landed = settle.await.unwrap();
            assert_eq!(landed.transition, Transition::Done);
            ends += landed
                .events
                .iter()
                .filter(|r| matches!(&r.event, Event::StepState { step_id, state: StepState::Success, .. } if step_id == "c1-root"))
                .count();
        }
        assert_eq!(ends, 1, "the parent ended exactly once");
        assert_eq!(
            store.change("c1").await.unwrap().state,
            ChangeState::Success
        );
        let events = store.events_after("c1", 0).await.unwrap();
        let changes = events
            .iter()
            .filter(|r| {
                matches!(
                    r.event,
                    Event::ChangeState {
                        state: ChangeState::Success,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(changes, 1, "the change ended exactly once");
    }
);

// ---- Wake-ups (src/store/wakeups.rs). Followers wait with a 60 s fallback, so only a notification (or an
// in-process signal) can wake them within a test: each case asserts *that* its follower was notified, not how fast.
mod wakeups {
    use super::*;
    use runner::store::Woke;
    use std::time::Duration;

    /// Long enough that a follower woken within a test was woken by a notification.
    const NEVER: Duration = Duration::from_secs(60);

    fn lines_only(change: &str, n: i64) -> BatchEntry {
        let lines: Vec<ChunkLine> = (0..n)
            .map(|i| ChunkLine {
                step_id: format!("{change}-root"),
                stream: Stream::Stdout,
                at_ms: 1_700_000_000_000 + i,
                line: format!("line {i}"),
            })
            .collect();
        BatchEntry::Lines {
            count: n,
            first_at: lines[0].at_ms,
            last_at: lines[n as usize - 1].at_ms,
            text_bytes: lines.iter().map(|l| l.line.len() as i64 + 1).sum(),
            chunk: chunk::encode(&lines),
        }
    }

    fn running() -> Event {
        Event::ChangeState {
            state: ChangeState::Running,
            reason: None,
        }
    }

    async fn postgres_pair() -> Option<(Store, Store, String, tempfile::TempDir)> {
        if !support::postgres::postgres_available() {
            return None;
        }
        let url = support::postgres::shared().database();
        let home = tempfile::tempdir().unwrap();
        let follower = Store::connect(home.path(), Some(&url)).await.unwrap();
        // Another process's handle: its own pool, its own connections.
        let writer = Store::connect(home.path(), Some(&url)).await.unwrap();
        follower.set_follow_fallback(NEVER);
        Some((follower, writer, url, home))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_another_handles_event_and_log_lines_wake_the_changes_follower() {
        let Some((follower, writer, _url, _home)) = postgres_pair().await else {
            return;
        };
        project_env(&writer).await;
        new_change(&writer, "c1", "w").await;
        new_change(&writer, "c2", "w").await;
        let mut c1 = follower.change_signal("c1").await;
        assert_eq!(c1.fallback(), NEVER);
        writer.append_event("c1", &running()).await.unwrap();
        assert_eq!(c1.wait().await, Woke::Notified, "an event of c1");
        // Log lines alone (a chunk, no event) wake it too.
        writer
            .append_batch("c1", &[lines_only("c1", 3)])
            .await
            .unwrap();
        assert_eq!(c1.wait().await, Woke::Notified, "log lines of c1");
        // Another change's news is not c1's.
        writer.append_event("c2", &running()).await.unwrap();
        assert_eq!(
            c1.wait_at_most(Duration::from_millis(100)).await,
            Woke::Fallback,
            "c2's event woke c1's follower"
        );
        // Its end is an event too (the row's move alone does not wake followers: see migration 0060).
        let ended = Event::ChangeState {
            state: ChangeState::Cancelled,
            reason: None,
        };
        writer.append_event("c1", &ended).await.unwrap();
        assert_eq!(c1.wait().await, Woke::Notified, "c1 ended");
        follower.close().await;
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_another_handles_new_change_and_cancel_wake_the_workers() {
        let Some((follower, writer, _url, _home)) = postgres_pair().await else {
            return;
        };
        project_env(&writer).await;
        let mut work = follower.work_signal().await;
        new_change(&writer, "c1", "").await;
        assert_eq!(work.wait().await, Woke::Notified, "a queued change");
        writer.request_cancel("c1").await.unwrap();
        assert_eq!(work.wait().await, Woke::Notified, "a cancel request");
        follower.close().await;
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_listener_whose_connection_is_killed_wakes_its_followers_and_listens_again()
    {
        let Some((follower, writer, url, _home)) = postgres_pair().await else {
            return;
        };
        project_env(&writer).await;
        new_change(&writer, "c1", "w").await;
        let mut c1 = follower.change_signal("c1").await;
        let admin = sqlx::PgPool::connect(&url).await.unwrap();
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(killed, 1, "one listening connection per store handle");
        // Whatever was announced while it was gone is unknown: its followers are told to look again.
        assert_eq!(c1.wait().await, Woke::Notified, "the reconnect");
        // And it listens again.
        let mut c1 = follower.change_signal("c1").await;
        writer.append_event("c1", &running()).await.unwrap();
        assert_eq!(
            c1.wait().await,
            Woke::Notified,
            "an event after the reconnect"
        );
        admin.close().await;
        follower.close().await;
        writer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_writers_of_this_process_wake_followers_and_other_processes_are_polled() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::connect(home.path(), None).await.unwrap();
        project_env(&store).await;
        new_change(&store, "c1", "w").await;
        new_change(&store, "c2", "w").await;
        assert_eq!(store.follow_fallback(), runner::store::SQLITE_FALLBACK);
        store.set_follow_fallback(NEVER);
        let mut c1 = store.change_signal("c1").await;
        let writer = store.clone();
        tokio::spawn(async move { writer.append_event("c1", &running()).await.unwrap() });
        assert_eq!(c1.wait().await, Woke::Notified, "an event of c1");
        store
            .append_batch("c1", &[lines_only("c1", 2)])
            .await
            .unwrap();
        assert_eq!(c1.wait().await, Woke::Notified, "log lines of c1");
        let mut work = store.work_signal().await;
        store.request_cancel("c2").await.unwrap();
        assert_eq!(work.wait().await, Woke::Notified, "a cancel request");
        // Another process's store handle cannot signal this one: its writes are found by the fallback poll.
        let other = Store::connect(home.path(), None).await.unwrap();
        let before = store.last_seq("c1").await.unwrap();
        other.append_event("c1", &running()).await.unwrap();
        assert_eq!(
            c1.wait_at_most(Duration::from_millis(20)).await,
            Woke::Fallback
        );
        assert!(store.last_seq("c1").await.unwrap() > before);
        other.close().await;
        store.close().await;
    }
}

// ---- Writers on two handles (two processes' pools) of one store: row locks, not a store-wide lock, keep them
// ---- correct on PostgreSQL.

/// Runs `case` with two handles of one fresh store of each backend, as two processes would have them, and raw
/// access to its database.
macro_rules! contract_pair {
    ($name:ident, $case:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let home = tempfile::tempdir().unwrap();
                let a = Store::connect(home.path(), None).await.unwrap();
                let b = Store::connect(home.path(), None).await.unwrap();
                let raw = Raw::Sqlite(home.path().join("runner.db"));
                ($case)(a.clone(), b.clone(), raw).await;
                a.close().await;
                b.close().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if !support::postgres::postgres_available() {
                    return;
                }
                let url = support::postgres::shared().database();
                let home = tempfile::tempdir().unwrap();
                let a = Store::connect(home.path(), Some(&url)).await.unwrap();
                let b = Store::connect(home.path(), Some(&url)).await.unwrap();
                ($case)(a.clone(), b.clone(), Raw::Postgres(url)).await;
                a.close().await;
                b.close().await;
            }
        }
    };
}

/// Adds one to `counter` in the owners' documents, read-modify-write with retries on version conflicts.
async fn increment(store: &Store, owners: &[&PropertiesOwner]) {
    loop {
        let mut current = vec![];
        for owner in owners {
            current.push(store.properties(owner, None).await.unwrap());
        }
        let docs: Vec<serde_json::Value> = current
            .iter()
            .map(|c| json!({ "counter": c.document["counter"].as_i64().unwrap_or(0) + 1 }))
            .collect();
        let writes: Vec<PropertiesWrite> = owners
            .iter()
            .zip(&current)
            .zip(&docs)
            .map(|((owner, c), doc)| PropertiesWrite {
                owner,
                expected_version: c.version,
                document: doc,
            })
            .collect();
        match store.write_properties(&writes, &WrittenBy::Cli).await {
            Ok(_) => return,
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(e) => panic!("a property write failed otherwise than by a version conflict: {e:?}"),
        }
    }
}

contract_pair!(
    property_writers_on_two_handles_lose_no_update,
    |a: Store, b: Store, _raw: Raw| async move {
        let (p, e) = project_env(&a).await;
        let (p, e) = (PropertiesOwner::from(&p), PropertiesOwner::from(&e));
        // Racing on one version: one wins, the other is told the version moved on.
        let (doc_a, doc_b) = (
            json!({ "counter": 0, "by": "a" }),
            json!({ "counter": 0, "by": "b" }),
        );
        let write_a = [PropertiesWrite {
            owner: &p,
            expected_version: 1,
            document: &doc_a,
        }];
        let write_b = [PropertiesWrite {
            owner: &p,
            expected_version: 1,
            document: &doc_b,
        }];
        let (x, y) = tokio::join!(
            a.write_properties(&write_a, &WrittenBy::Cli),
            b.write_properties(&write_b, &WrittenBy::Cli),
        );
        let lost = match (x, y) {
            (Ok(_), Err(lost)) | (Err(lost), Ok(_)) => lost,
            other => panic!("exactly one of two writers on version 1 must win: {other:?}"),
        };
        assert!(
            matches!(
                lost,
                StoreError::VersionConflict {
                    expected: 1,
                    current: 2,
                    ..
                }
            ),
            "{lost:?}"
        );
        // Read-modify-write loops on both handles, over one owner and over both owners named in opposite
        // orders (a lock order that followed the caller's would deadlock): every increment lands once.
        const ROUNDS: i64 = 15;
        let run = |store: Store, p: PropertiesOwner, e: PropertiesOwner, flip: bool| async move {
            for _ in 0..ROUNDS {
                increment(&store, &[&p]).await;
                if flip {
                    increment(&store, &[&e, &p]).await;
                } else {
                    increment(&store, &[&p, &e]).await;
                }
            }
        };
        tokio::join!(
            run(a.clone(), p.clone(), e.clone(), false),
            run(b.clone(), p.clone(), e.clone(), true)
        );
        let project = a.properties(&p, None).await.unwrap();
        assert_eq!(project.document["counter"], json!(4 * ROUNDS));
        assert_eq!(project.version, 2 + 4 * ROUNDS);
        let environment = b.properties(&e, None).await.unwrap();
        assert_eq!(environment.document["counter"], json!(2 * ROUNDS));
        assert_eq!(environment.version, 1 + 2 * ROUNDS);
        let versions: Vec<i64> = a
            .properties_history(&p)
            .await
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, (1..=2 + 4 * ROUNDS).collect::<Vec<_>>());
    }
);

contract_pair!(
    batches_from_two_handles_number_one_change_without_gaps,
    |a: Store, b: Store, _raw: Raw| async move {
        project_env(&a).await;
        new_change(&a, "c1", "o1").await;
        let batch = |who: &str, n: usize| {
            let lines: Vec<ChunkLine> = (0..3)
                .map(|l| ChunkLine {
                    step_id: "c1-root".into(),
                    stream: Stream::Stdout,
                    at_ms: 1,
                    line: format!("{who} {n} line {l}"),
                })
                .collect();
            let phase = |what: &str| BatchEntry::Event {
                event: Event::Log {
                    step_id: "c1-root".into(),
                    stream: Stream::Stderr,
                    line: format!("{who} {n} {what}"),
                },
                at: "2026-01-01T00:00:00.000Z".into(),
            };
            vec![
                phase("first"),
                BatchEntry::Lines {
                    count: 3,
                    first_at: 1,
                    last_at: 1,
                    text_bytes: 30,
                    chunk: chunk::encode(&lines),
                },
                phase("second"),
                phase("third"),
            ]
        };
        const BATCHES: usize = 12;
        let run = |store: Store, who: &'static str| async move {
            let mut firsts = vec![];
            for n in 0..BATCHES {
                firsts.push(store.append_batch("c1", &batch(who, n)).await.unwrap());
            }
            firsts
        };
        let (fa, fb) = tokio::join!(run(a.clone(), "a"), run(b.clone(), "b"));
        let records = a.events_after("c1", 0).await.unwrap();
        let total = 2 * BATCHES * 6;
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=total as i64).collect::<Vec<_>>(),
            "every number used once, none skipped"
        );
        assert_eq!(b.last_seq("c1").await.unwrap(), total as i64);
        // Each batch's entries are consecutive and in the order given, whichever handle stored it.
        for (who, firsts) in [("a", fa), ("b", fb)] {
            for (n, first) in firsts.into_iter().enumerate() {
                let got: Vec<String> = records[first as usize - 1..first as usize + 5]
                    .iter()
                    .map(|r| match &r.event {
                        Event::Log { line, .. } => line.clone(),
                        other => panic!("{other:?}"),
                    })
                    .collect();
                let want: Vec<String> = ["first", "line 0", "line 1", "line 2", "second", "third"]
                    .iter()
                    .map(|w| format!("{who} {n} {w}"))
                    .collect();
                assert_eq!(got, want);
            }
        }
        // A batch too big for one statement is stored the other way, numbered alike.
        let big: Vec<BatchEntry> = (0..3).flat_map(|n| batch("big", n)).collect();
        assert_eq!(big.len(), 12);
        let big: Vec<BatchEntry> = big
            .into_iter()
            .chain((0..2).flat_map(|n| batch("more", n)))
            .collect();
        let first = b.append_batch("c1", &big).await.unwrap();
        assert_eq!(first, total as i64 + 1);
        assert_eq!(a.last_seq("c1").await.unwrap(), total as i64 + 5 * 6);
        let records = a.events_after("c1", total as i64).await.unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (total as i64 + 1..=total as i64 + 30).collect::<Vec<_>>()
        );
        // A batch for a change that does not exist stores nothing and says so, small or big.
        for entries in [&batch("x", 0)[..], &big[..]] {
            let err = a.append_batch("nope", entries).await.unwrap_err();
            assert!(
                matches!(err, StoreError::NotFound { what: "change", .. }),
                "{err:?}"
            );
        }
    }
);

contract_pair!(
    an_abandoned_request_id_is_taken_over_once,
    |a: Store, b: Store, raw: Raw| async move {
        // Its call died with its server long ago: a repeat may take it over, but of several repeats at once only
        // one. Tried on several ids, so that the repeats really overlap on some.
        let long_ago = (chrono::Utc::now() - chrono::Duration::minutes(30))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for n in 0..12 {
            let id = format!("r{n}");
            assert_eq!(
                a.claim_request(&id, "CreateChange", "f1").await.unwrap(),
                runner::store::RequestClaim::New
            );
            raw.execute(&format!(
                "UPDATE api_requests SET created_at = '{long_ago}' WHERE request_id = '{id}'"
            ))
            .await
            .unwrap();
            let repeats: Vec<_> = [&a, &b, &a, &b]
                .into_iter()
                .map(|store| {
                    let (store, id) = (store.clone(), id.clone());
                    tokio::spawn(async move {
                        store
                            .claim_request(&id, "CreateChange", "f1")
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut new = 0;
            for repeat in repeats {
                match repeat.await.unwrap() {
                    runner::store::RequestClaim::New => new += 1,
                    runner::store::RequestClaim::InProgress => {}
                    other => panic!("a repeat of an abandoned request got {other:?}"),
                }
            }
            assert_eq!(new, 1, "request {id}: exactly one repeat takes it over");
        }
    }
);
