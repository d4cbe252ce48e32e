//! Orchestration without a daemon: the fake executor plays each action's container.

mod support;

use runner::app::App;
use runner::events::{ChangeState, Event, StepState};
use runner::orchestrator::{CreateChange, Orchestrator, Settings};
use runner::store::{Claim, ClaimScope, PropertiesOwner, Step, StepSettle, Transition, WrittenBy};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use support::fakes::{FakeExecutor, Script};
use support::fakes::{FakeImages, FakeSources};
use tokio_util::sync::CancellationToken;

struct World {
    _home: tempfile::TempDir,
    orchestrator: Orchestrator,
    executor: Arc<FakeExecutor>,
}

fn ok() -> Script {
    Script::default()
}

fn fails() -> Script {
    Script {
        exit_code: 3,
        ..Default::default()
    }
}

fn patches(project: Value, environment: Value) -> Script {
    Script {
        result: Some(
            json!({"project": {"properties_diff": project}, "environment": {"properties_diff": environment}}),
        ),
        ..Default::default()
    }
}

async fn world(manifest: Value, scripts: Vec<(&str, Script)>) -> World {
    world_with_policy(manifest, scripts, "").await
}

/// A world whose operator wrote `policy` (TOML) to the data directory's policy.toml.
async fn world_with_policy(manifest: Value, scripts: Vec<(&str, Script)>, policy: &str) -> World {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("policy.toml"), policy).unwrap();
    let app = App::open(home.path()).await.unwrap();
    app.create_project("demo", "Demo", Some("/nowhere"))
        .await
        .unwrap();
    app.create_environment("demo", "dev", "Dev").await.unwrap();
    app.create_environment("demo", "prod", "Prod")
        .await
        .unwrap();
    let executor = Arc::new(FakeExecutor {
        scripts: scripts
            .into_iter()
            .map(|(a, s)| (a.to_owned(), s))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    });
    let sources = Arc::new(FakeSources {
        manifest,
        properties: json!({"from_repo": true}),
    });
    let settings = Settings {
        poll: Duration::from_millis(20),
        ..Default::default()
    };
    let orchestrator = Orchestrator::new(
        app,
        sources,
        Arc::new(FakeImages),
        executor.clone(),
        settings,
    );
    World {
        _home: home,
        orchestrator,
        executor,
    }
}

impl World {
    async fn create(&self, env: &str, action: &str) -> String {
        let request = CreateChange {
            project: "demo".into(),
            environment: env.into(),
            git_rev: "main".into(),
            action: action.into(),
        };
        self.orchestrator.create_change(&request).await.unwrap().id
    }

    /// Creates a change owned by another runner process `owner` (which holds no lease unless the test takes one).
    async fn create_as(&self, owner: &str, env: &str, action: &str) -> String {
        let request = CreateChange {
            project: "demo".into(),
            environment: env.into(),
            git_rev: "main".into(),
            action: action.into(),
        };
        let other = self.orchestrator.clone().with_owner(owner.into());
        other.create_change(&request).await.unwrap().id
    }

    async fn run(&self, action: &str) -> (ChangeState, Vec<Step>) {
        let id = self.create("dev", action).await;
        let change = self
            .orchestrator
            .run_change(&id, CancellationToken::new())
            .await
            .unwrap();
        (
            change.state,
            self.orchestrator.app().store.steps(&id).await.unwrap(),
        )
    }

    fn ran(&self) -> Vec<String> {
        self.executor
            .runs
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                r.step_context["context"]["step"]["action"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

fn states(steps: &[Step]) -> Vec<(String, StepState)> {
    steps.iter().map(|s| (s.action.clone(), s.state)).collect()
}

fn tree() -> Value {
    json!({"actions": {
        "seq": {"steps": ["a", "b", "c"]},
        "par": {"steps": ["a", "b", "c"], "run_as": "parallel"},
        "a": {"run": "a"}, "b": {"run": "b"}, "c": {"run": "c"},
        "lenient": {"steps": ["b", "c"], "run_as": "sequential"},
        "soft": {"run": "soft", "ignore_failure": true},
        "tolerant": {"steps": ["soft", "c"]},
        "dynamic": {"run": "dynamic"},
        "p1": {"run": "p1"}, "p2": {"run": "p2"}, "pp": {"steps": ["p1", "p2"], "run_as": "parallel"},
        "slow": {"run": "slow"}, "timed": {"run": "slow", "timeout": "50ms"}
    }})
}

#[tokio::test]
async fn sequential_tree_stops_at_first_failure_and_aborts_the_rest() {
    let w = world(tree(), vec![("a", ok()), ("b", fails()), ("c", ok())]).await;
    let (state, steps) = w.run("seq").await;
    assert_eq!(state, ChangeState::Error);
    assert_eq!(
        states(&steps),
        [
            ("seq".into(), StepState::Error),
            ("a".into(), StepState::Success),
            ("b".into(), StepState::Error),
            ("c".into(), StepState::Aborted)
        ]
    );
    assert_eq!(w.ran(), ["a", "b"]);
    assert_eq!(
        steps[2].exit_code,
        Some(3),
        "a failed step keeps its exit code"
    );
    assert!(steps[2]
        .reason
        .as_deref()
        .unwrap()
        .contains("exited with code 3"));
}

#[tokio::test]
async fn parallel_tree_lets_siblings_finish_and_fails_the_parent() {
    let slow_ok = Script {
        delay: Duration::from_millis(100),
        ..ok()
    };
    let w = world(
        tree(),
        vec![("a", slow_ok.clone()), ("b", fails()), ("c", slow_ok)],
    )
    .await;
    let (state, steps) = w.run("par").await;
    assert_eq!(state, ChangeState::Error);
    assert_eq!(
        states(&steps),
        [
            ("par".into(), StepState::Error),
            ("a".into(), StepState::Success),
            ("b".into(), StepState::Error),
            ("c".into(), StepState::Success)
        ]
    );
    assert_eq!(w.ran().len(), 3);
}

#[tokio::test]
async fn ignore_failure_keeps_the_parent_going() {
    let w = world(tree(), vec![("soft", fails()), ("c", ok())]).await;
    let (state, steps) = w.run("tolerant").await;
    assert_eq!(state, ChangeState::Success);
    assert_eq!(states(&steps)[1], ("soft".into(), StepState::Error));
    assert_eq!(states(&steps)[2], ("c".into(), StepState::Success));
}

#[tokio::test]
async fn dynamic_children_run_with_their_strategy_and_patches_apply() {
    let dynamic = Script {
        result: Some(json!({
            "project": {"properties_diff": [{"op": "add", "path": "/deployed", "value": true}]},
            "environment": {"properties_diff": []},
            "step": {"properties": {"seen": 1}},
            "steps": {"children": [{"action": "a"}, {"action": "b"}], "child_execution_strategy": "parallel"}
        })),
        ..ok()
    };
    let w = world(tree(), vec![("dynamic", dynamic), ("a", ok()), ("b", ok())]).await;
    let (state, steps) = w.run("dynamic").await;
    assert_eq!(state, ChangeState::Success, "{steps:?}");
    assert_eq!(states(&steps).len(), 3);
    assert_eq!(steps[0].children_strategy.as_deref(), Some("parallel"));
    assert_eq!(steps[0].properties, Some(json!({"seen": 1})));
    let app = w.orchestrator.app();
    let props = app
        .properties(
            &runner::app::Scope::Project {
                project: "demo".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(props.document, json!({"deployed": true}));
    assert_eq!(props.version, 2);
    assert!(matches!(
        props.written_by,
        runner::store::WrittenBy::Change { .. }
    ));
    // The step context carried the seed-003 sections and the repository properties.
    let first = w.executor.runs.lock().unwrap()[0].clone();
    assert_eq!(
        first.step_context["repository"]["properties"],
        json!({"from_repo": true})
    );
    assert_eq!(
        first.step_context["context"]["change"]["git_sha"],
        "sha-main"
    );
}

#[tokio::test]
async fn conflicting_parallel_patch_fails_with_a_report_and_applies_nothing() {
    let p1 = Script {
        delay: Duration::from_millis(10),
        ..patches(
            json!([{"op": "add", "path": "/version", "value": "1"}]),
            json!([]),
        )
    };
    let p2 = Script {
        delay: Duration::from_millis(150),
        ..patches(
            json!([{"op": "add", "path": "/version", "value": "2"}]),
            json!([{"op": "add", "path": "/e", "value": 1}]),
        )
    };
    let w = world(tree(), vec![("p1", p1), ("p2", p2)]).await;
    let (state, steps) = w.run("pp").await;
    assert_eq!(state, ChangeState::Error);
    let p2 = steps.iter().find(|s| s.action == "p2").unwrap();
    assert_eq!(p2.state, StepState::Error);
    let reason = p2.reason.as_deref().unwrap();
    assert!(
        reason.contains(
            "conflicts with changes applied since version 1: /version (changed at /version)"
        ),
        "{reason}"
    );
    for part in ["\"base\"", "\"applied\"", "\"rejected\"", "\"current\""] {
        assert!(reason.contains(part), "{reason}");
    }
    let app = w.orchestrator.app();
    let env = app
        .properties(
            &runner::app::Scope::Environment {
                project: "demo".into(),
                environment: "dev".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        env.version, 1,
        "the failed step's environment patch must not land"
    );
}

#[tokio::test]
async fn timeout_and_cancel_stop_the_step() {
    let slow = Script {
        delay: Duration::from_secs(30),
        ..ok()
    };
    let w = world(tree(), vec![("slow", slow.clone()), ("timed", slow)]).await;
    let (state, steps) = w.run("timed").await;
    assert_eq!(state, ChangeState::Error);
    assert!(steps[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("timed out after 50ms"));

    let id = w.create("dev", "slow").await;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let o = w.orchestrator.clone();
        let (id, cancel) = (id.clone(), cancel.clone());
        async move { o.run_change(&id, cancel).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Cancelling through the store, as `runner change cancel` from another process does.
    w.orchestrator.cancel_change(&id).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change.state, ChangeState::Cancelled);
}

#[tokio::test]
async fn retry_reruns_from_the_failed_step_with_the_same_sha() {
    let w = world(tree(), vec![("a", ok()), ("b", fails()), ("c", ok())]).await;
    let id = w.create("dev", "seq").await;
    w.orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(w.ran(), ["a", "b"]);
    w.orchestrator.prepare_retry(&id).await.unwrap();
    let change = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(change.state, ChangeState::Error, "b still fails");
    assert_eq!(w.ran(), ["a", "b", "b"], "a is not run again");
    assert_eq!(change.git_sha, "sha-main");
    let err = w
        .orchestrator
        .prepare_retry(&w.create("dev", "a").await)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only a change that ended in error"),
        "{err}"
    );
}

#[tokio::test]
async fn a_retry_keeps_the_earlier_attempts_step_records_and_tags_events_with_their_attempt() {
    let w = world(tree(), vec![("a", ok()), ("b", fails()), ("c", ok())]).await;
    let store = &w.orchestrator.app().store;
    let id = w.create("dev", "seq").await;
    assert_eq!(store.change(&id).await.unwrap().attempt, 1);
    w.orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    let first_end = store.last_seq(&id).await.unwrap();
    w.orchestrator.prepare_retry(&id).await.unwrap();
    let change = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((change.state, change.attempt), (ChangeState::Error, 2));

    let by_action = |steps: &[Step], action: &str| -> Step {
        steps.iter().find(|s| s.action == action).unwrap().clone()
    };
    // Attempt 1 as it ended: b failed with its reason, c was aborted; nothing of attempt 2 leaked into it.
    let first = store.steps_in_attempt(&id, 1).await.unwrap();
    let b1 = by_action(&first, "b");
    assert_eq!((b1.state, b1.attempt), (StepState::Error, 1));
    assert!(b1.reason.as_deref().unwrap().contains('3'), "{b1:?}");
    assert_eq!(b1.exit_code, Some(3));
    assert_eq!(by_action(&first, "c").state, StepState::Aborted);
    assert!(first.iter().all(|s| s.attempt == 1), "{first:?}");
    let first_change = store.change_in_attempt(&id, 1).await.unwrap();
    assert_eq!(
        (first_change.state, first_change.attempt),
        (ChangeState::Error, 1)
    );
    assert!(first_change.reason.is_some());
    assert_eq!(store.step_in_attempt(&b1.id, 1).await.unwrap(), b1);

    // Attempt 2 (the current one, the default): b ran again, a was kept from attempt 1 and says so.
    let current = store.steps(&id).await.unwrap();
    assert_eq!(current, store.steps_in_attempt(&id, 0).await.unwrap());
    assert_eq!(current, store.steps_in_attempt(&id, 2).await.unwrap());
    let b2 = by_action(&current, "b");
    assert_eq!(
        (b2.id.clone(), b2.state, b2.attempt),
        (b1.id.clone(), StepState::Error, 2)
    );
    assert_ne!(b2.started_at, b1.started_at, "attempt 2 started b again");
    assert_eq!(
        by_action(&current, "a").attempt,
        1,
        "a succeeded in attempt 1"
    );
    assert_eq!(store.change_in_attempt(&id, 0).await.unwrap().attempt, 2);
    // Attempts it never had are not found.
    for missing in [3, -1] {
        assert!(store.change_in_attempt(&id, missing).await.is_err());
        assert!(store.steps_in_attempt(&id, missing).await.is_err());
    }

    // Events of both attempts: numbered 1.. without gaps, each tagged with its attempt.
    let events = store.events_after(&id, 0).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    assert!(events.iter().any(|e| e.attempt == 2));
    for e in &events {
        let expected = if e.seq <= first_end { 1 } else { 2 };
        assert_eq!(e.attempt, expected, "{e:?}");
    }
    let failed_b = |attempt: i64| {
        events.iter().any(|e| {
            e.attempt == attempt
                && matches!(&e.event, Event::StepState { step_id, state: StepState::Error, .. } if *step_id == b1.id)
        })
    };
    assert!(failed_b(1) && failed_b(2), "b failed in each attempt");
}

#[tokio::test]
async fn changes_on_one_environment_queue_and_other_environments_do_not_wait() {
    let slow = Script {
        delay: Duration::from_millis(300),
        ..ok()
    };
    let w = world(tree(), vec![("slow", slow)]).await;
    let first = w.create("dev", "slow").await;
    let second = w.create("dev", "slow").await;
    let other = w.create("prod", "slow").await;
    let start = std::time::Instant::now();
    let run = |id: String| {
        let o = w.orchestrator.clone();
        tokio::spawn(async move {
            (
                o.run_change(&id, CancellationToken::new()).await.unwrap(),
                std::time::Instant::now(),
            )
        })
    };
    let (h2, h1, h3) = (run(second.clone()), run(first.clone()), run(other.clone()));
    let (c1, t1) = h1.await.unwrap();
    let (c2, t2) = h2.await.unwrap();
    let (c3, t3) = h3.await.unwrap();
    assert!([c1.state, c2.state, c3.state]
        .iter()
        .all(|s| *s == ChangeState::Success));
    // The second change on dev waited for the first (created earlier) although it was started first.
    assert!(t2 > t1, "second finished before first");
    assert!(c2.started_at.unwrap() >= c1.finished_at.unwrap());
    // prod ran alongside.
    assert!(t3.duration_since(start) < t2.duration_since(start));
}

#[tokio::test]
async fn events_are_stored_in_order_and_the_reaper_fails_changes_of_dead_runners() {
    let w = world(
        tree(),
        vec![(
            "a",
            Script {
                output: vec!["hello".into()],
                ..ok()
            },
        )],
    )
    .await;
    let id = w.create("dev", "a").await;
    w.orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    let events = w
        .orchestrator
        .app()
        .store
        .events_after(&id, 0)
        .await
        .unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    assert!(events
        .iter()
        .any(|e| matches!(&e.event, Event::Log { line, .. } if line == "hello")));
    assert!(matches!(
        events.last().unwrap().event,
        Event::ChangeState {
            state: ChangeState::Success,
            ..
        }
    ));

    // A change claimed by an owner that holds no lease (a killed runner) is failed by the next runner's reaper.
    let store = &w.orchestrator.app().store;
    let orphan = w.create_as("dead-runner", "prod", "a").await;
    store.queue_change(&orphan, "dead-runner").await.unwrap();
    assert_eq!(
        store
            .claim_environment(&orphan, "dead-runner")
            .await
            .unwrap(),
        Claim::Claimed
    );
    let reaped = w.orchestrator.reap().await.unwrap();
    assert_eq!(reaped.changes, std::slice::from_ref(&orphan));
    let change = store.change(&orphan).await.unwrap();
    assert_eq!(change.state, ChangeState::Error);
    assert!(change.reason.unwrap().contains("dead-runner"));
}

#[tokio::test]
async fn service_images_are_built_and_dind_prepared_before_the_step_runs() {
    let manifest = json!({"actions": {
        "it": {"run": "it", "docker": "dind", "services": {
            "api": {"build": "services/api/Dockerfile"},
            "db": {"image": "local/db:1"}}},
        "broken": {"run": "broken", "services": {"api": {"build": "missing/Dockerfile"}}}
    }});
    let w = world_with_policy(
        manifest,
        vec![("it", ok()), ("broken", ok())],
        "[[grant]]\nproject = \"demo\"\ndocker_dind = true\n",
    )
    .await;
    let (state, _) = w.run("it").await;
    assert_eq!(state, ChangeState::Success);
    let run = w.executor.runs.lock().unwrap()[0].clone();
    assert_eq!(
        run.services["api"].image.as_deref(),
        Some("fake-service:api")
    );
    assert_eq!(run.services["db"].image.as_deref(), Some("local/db:1"));
    assert_eq!(
        run.docker,
        Some(runner::executor::StepDocker::Dind {
            image: "fake-dind".into()
        })
    );

    let (state, steps) = w.run("broken").await;
    assert_eq!(state, ChangeState::Error);
    assert_eq!(
        w.ran(),
        ["it"],
        "a step whose service cannot be built does not run"
    );
    let reason = steps[0].reason.clone().unwrap();
    assert!(
        reason.contains("failed to build the image of service \"api\" from missing/Dockerfile")
            && reason.contains("does not exist"),
        "{reason}"
    );
}

#[tokio::test]
async fn bad_requests_fail_before_anything_runs() {
    let w = world(tree(), vec![]).await;
    let request = |action: &str, env: &str| CreateChange {
        project: "demo".into(),
        environment: env.into(),
        git_rev: "main".into(),
        action: action.into(),
    };
    let err = w
        .orchestrator
        .create_change(&request("nope", "dev"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("action \"nope\" is not defined in .opschain/actions.json"),
        "{err}"
    );
    let err = w
        .orchestrator
        .create_change(&request("a", "qa"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("environment \"qa\" does not exist"),
        "{err}"
    );
    let cyclic = world(json!({"actions": {"x": {"steps": ["x"]}}}), vec![]).await;
    let err = cyclic
        .orchestrator
        .create_change(&request("x", "dev"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("form a cycle: x -> x"), "{err}");
    assert!(w.executor.runs.lock().unwrap().is_empty());
}

/// A runner process that is alive: it holds a lease in the store.
async fn live_lease(w: &World, owner: &str) {
    w.orchestrator
        .clone()
        .with_owner(owner.into())
        .take_lease_for(std::process::id())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_change_has_its_runner_as_owner_from_creation() {
    let w = world(tree(), vec![("a", ok())]).await;
    let id = w.create("dev", "a").await;
    let change = w.orchestrator.app().store.change(&id).await.unwrap();
    assert_eq!(change.state, ChangeState::Pending);
    assert_eq!(change.owner.as_deref(), Some(w.orchestrator.owner()));
}

#[tokio::test]
async fn an_orphaned_pending_change_is_reaped_with_a_reason_and_frees_its_environment() {
    let w = world(tree(), vec![("a", ok())]).await;
    let store = &w.orchestrator.app().store;
    let orphan = w.create_as("killed-before-running", "dev", "a").await;
    let queued = w.create_as("killed-while-queued", "dev", "a").await;
    store
        .queue_change(&queued, "killed-while-queued")
        .await
        .unwrap();
    // Only the store is needed: this is what `change show` and `change list` do before answering.
    let reaped = runner::orchestrator::reap_changes(store, None)
        .await
        .unwrap();
    assert_eq!(reaped.len(), 2);
    for id in [&orphan, &queued] {
        let change = store.change(id).await.unwrap();
        assert_eq!(change.state, ChangeState::Error);
        let reason = change.reason.unwrap();
        assert!(
            reason.contains("died before the change started"),
            "{reason}"
        );
        assert!(reason.contains("change retry"), "{reason}");
        let steps = store.steps(id).await.unwrap();
        assert!(steps.iter().all(|s| s.state == StepState::Aborted));
    }
    // The environment is free again: the next change runs at once.
    let (state, _) = tokio::time::timeout(Duration::from_secs(5), w.run("a"))
        .await
        .expect("the next change on the environment must not wait behind the orphans");
    assert_eq!(state, ChangeState::Success);
}

#[tokio::test]
async fn a_live_runners_changes_are_never_reaped() {
    let w = world(tree(), vec![("a", ok())]).await;
    live_lease(&w, "alive").await;
    let id = w.create_as("alive", "dev", "a").await;
    let reaped = runner::orchestrator::reap_changes(&w.orchestrator.app().store, None)
        .await
        .unwrap();
    assert!(reaped.is_empty());
    let change = w.orchestrator.app().store.change(&id).await.unwrap();
    assert_eq!(change.state, ChangeState::Pending);
}

#[tokio::test]
async fn a_change_runs_at_most_once() {
    let w = world(tree(), vec![("a", ok())]).await;
    let id = w.create("dev", "a").await;
    let change = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(change.state, ChangeState::Success);
    let again = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(again.to_string().contains("change retry"), "{again}");
    assert_eq!(w.ran(), ["a"]);
    // Nor can another process run a change it does not hold.
    let other = w.create("dev", "a").await;
    let err = w
        .orchestrator
        .clone()
        .with_owner("intruder".into())
        .run_change(&other, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("another runner process holds it"),
        "{err}"
    );
    assert_eq!(w.ran(), ["a"]);
}

#[tokio::test]
async fn a_change_cancelled_before_it_starts_never_starts() {
    let w = world(tree(), vec![("a", ok())]).await;
    let id = w.create("dev", "a").await;
    // Its owner (this process) is alive, so the cancel is a request the runner honours.
    let requested = w.orchestrator.cancel_change(&id).await.unwrap();
    assert!(requested.cancel_requested);
    let change = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(change.state, ChangeState::Cancelled);
    assert_eq!(
        change.reason.as_deref(),
        Some("cancelled before it started")
    );
    assert!(w.ran().is_empty(), "a cancelled change ran a step");
}

#[tokio::test]
async fn of_two_concurrent_retries_one_wins_and_the_other_is_told_it_is_already_running() {
    let w = world(tree(), vec![("a", fails())]).await;
    let (state, _) = w.run("a").await;
    assert_eq!(state, ChangeState::Error);
    let id = w
        .orchestrator
        .app()
        .store
        .list_changes(&Default::default())
        .await
        .unwrap()[0]
        .id
        .clone();
    let first = w.orchestrator.clone().with_owner("first".into());
    let second = w.orchestrator.clone().with_owner("second".into());
    let (a, b) = tokio::join!(first.prepare_retry(&id), second.prepare_retry(&id));
    assert_eq!(
        a.is_ok() as u8 + b.is_ok() as u8,
        1,
        "exactly one retry wins: {a:?} {b:?}"
    );
    let err = a.err().or(b.err()).unwrap();
    assert!(err.to_string().contains("already running"), "{err}");
    assert_eq!(err.kind(), runner::error::ErrorKind::Conflict);
}

#[tokio::test]
async fn claiming_an_environment_checks_the_changes_own_state_and_owner() {
    let w = world(tree(), vec![("a", ok())]).await;
    let store = &w.orchestrator.app().store;
    let id = w.create_as("owner", "dev", "a").await;
    // Not queued yet, or queued by someone else: never claimed.
    assert_eq!(
        store.claim_environment(&id, "owner").await.unwrap(),
        Claim::Lost
    );
    store.queue_change(&id, "owner").await.unwrap();
    assert_eq!(
        store.claim_environment(&id, "other").await.unwrap(),
        Claim::Lost
    );
    // Cancelled while queued: never claimed.
    store.request_cancel(&id).await.unwrap();
    assert_eq!(
        store.claim_environment(&id, "owner").await.unwrap(),
        Claim::Lost
    );
}

#[tokio::test]
async fn a_requested_cancel_survives_the_runners_death() {
    let w = world(tree(), vec![("a", ok())]).await;
    let store = &w.orchestrator.app().store;
    let id = w.create_as("dies", "dev", "seq").await;
    store.queue_change(&id, "dies").await.unwrap();
    store.claim_environment(&id, "dies").await.unwrap();
    // The runner was running its first step when it died.
    store
        .claim_step("dies", ClaimScope::Change(&id))
        .await
        .unwrap()
        .expect("the root is ready");
    store.request_cancel(&id).await.unwrap();
    // `change cancel` from another process, after the runner died: the change ends cancelled, not error.
    let change = w.orchestrator.cancel_change(&id).await.unwrap();
    assert_eq!(change.state, ChangeState::Cancelled, "{:?}", change.reason);
    assert!(change
        .reason
        .unwrap()
        .contains("died before the cancel completed"));
}

#[tokio::test]
async fn a_later_success_replaces_an_earlier_reason() {
    let w = world(tree(), vec![("a", ok())]).await;
    let id = w.create("dev", "a").await;
    w.orchestrator.cancel_change(&id).await.unwrap();
    let cancelled = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert!(cancelled.reason.is_some());
    w.orchestrator.prepare_retry(&id).await.unwrap();
    let change = w
        .orchestrator
        .run_change(&id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(change.state, ChangeState::Success);
    assert_eq!(change.reason, None, "the cancel's reason was kept");
}

#[tokio::test]
async fn dynamic_children_are_validated_before_the_parents_patch_applies() {
    let manifest = json!({"actions": {
        "root": {"steps": ["loops"]},
        "loops": {"run": "loops"},
        "again": {"run": "again"},
        "many": {"run": "many"},
        "leaf": {"run": "leaf"}
    }});
    let child = |action: &str| json!({"action": action});
    let with = |children: Vec<Value>| Script {
        result: Some(json!({
            "project": {"properties_diff": [{"op": "add", "path": "/landed", "value": true}]},
            "steps": {"children": children}
        })),
        ..ok()
    };
    let w = world(
        manifest,
        vec![
            ("loops", with(vec![child("root")])),
            ("again", with(vec![child("again")])),
            ("many", with((0..101).map(|_| child("leaf")).collect())),
        ],
    )
    .await;
    let store = &w.orchestrator.app().store;
    let project = store.project("demo").await.unwrap();
    for (action, expected) in [
        ("root", "an action above this step"),
        ("again", "own action"),
        ("many", "at most 100"),
    ] {
        let (state, steps) = w.run(action).await;
        assert_eq!(state, ChangeState::Error, "{action}");
        let failed = steps.iter().find(|s| s.state == StepState::Error).unwrap();
        let reason = failed.reason.clone().unwrap();
        assert!(reason.contains(expected), "{action}: {reason}");
        let props = store.properties(&(&project).into(), None).await.unwrap();
        assert_eq!(props.version, 1, "{action}: the failed step's patch landed");
    }
}

#[tokio::test]
async fn a_step_whose_change_was_reaped_lands_nothing() {
    let w = world(tree(), vec![("a", ok())]).await;
    let store = &w.orchestrator.app().store;
    let id = w.create_as("dies", "dev", "a").await;
    store.queue_change(&id, "dies").await.unwrap();
    store.claim_environment(&id, "dies").await.unwrap();
    let claimed = store
        .claim_step("dies", ClaimScope::Change(&id))
        .await
        .unwrap()
        .expect("the root is ready once the change runs");
    let step = claimed.step;
    runner::orchestrator::reap_changes(store, None)
        .await
        .unwrap();
    // The dead runner's last words arrive late (or a retry replays them): refused, nothing written.
    let project = store.project("demo").await.unwrap();
    let owner: PropertiesOwner = (&project).into();
    let environment = store.environment("demo", "dev").await.unwrap();
    let env_owner: PropertiesOwner = (&environment).into();
    let patch = runner::orchestrator::patches::patches_from_result(
        &json!({"project": {"properties_diff": [{"op": "add", "path": "/x", "value": 1}]}}),
    )
    .unwrap();
    let settle = StepSettle {
        change_id: &id,
        step_id: &step.id,
        claim: &claimed.claim,
        exit_code: Some(0),
        properties: None,
        children: None,
    };
    let landed = runner::orchestrator::patches::apply_step_patches(
        store,
        (&owner, 1),
        (&env_owner, 1),
        &patch,
        &WrittenBy::Change {
            change_id: id.clone(),
            step_id: step.id.clone(),
        },
        Some(&settle),
    )
    .await
    .unwrap();
    assert_eq!(landed.transition, Transition::Refused);
    assert_eq!(store.properties(&owner, None).await.unwrap().version, 1);
    assert_eq!(store.step(&step.id).await.unwrap().state, StepState::Error);
}
