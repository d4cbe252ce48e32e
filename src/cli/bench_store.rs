//! `runner bench store`: the store overhead of one step, on SQLite (one process, the yardstick) and on a shared
//! PostgreSQL with 1, 2 and 3 concurrent workers (each its own connection pool, as separate worker processes have),
//! printed side by side with the goal of issue 16 (at most 10 ms per step on PostgreSQL).
//!
//! What is measured is the store work a step of a sequential change costs the worker that runs it, with no
//! container: claim it (its running state and the property versions it starts from), store its phases and a chunk
//! of output lines (one recorder flush), settle it with a property write (its end and the tree's advance in the
//! same transaction). The change-level work (create, queue, claim the environment, the root's claim and children;
//! the change ends with its last step's settle) is done once per change of `change_steps` steps and so spread over
//! them. Each worker drives its own changes on its own environment; the
//! figure per step is the worker's wall time divided by the steps it ran, so contention between workers (for the
//! database, its locks and this machine's cores) shows in it. Beside it: statements, transactions and
//! stand-alone writes per step, counted as the store sends them ([`crate::store::traffic`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::bench::bench_error;
use crate::error::Result;
use crate::events::{ChangeState, Event, Phase};
use crate::executor::Stream;
use crate::logs::chunk::{self, ChunkLine};
use crate::store::{
    BatchEntry, Claim, NewChange, NewStep, PropertiesOwner, PropertiesWrite, StepSettle, Store,
    Traffic, WrittenBy,
};

/// The goal of issue 16: store overhead per step on PostgreSQL, at most.
const GOAL_MS: f64 = 10.0;
/// Output lines a step stores (one chunk).
const LINES_PER_STEP: usize = 20;

/// One measured configuration.
struct Row {
    label: String,
    postgres: bool,
    workers: usize,
    steps: usize,
    elapsed: Duration,
    traffic: Traffic,
}

impl Row {
    fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.elapsed.as_secs_f64()
    }
    /// Store time one step costs the worker that runs it.
    fn ms_per_step(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1000.0 * self.workers as f64 / self.steps as f64
    }
    fn per_step(&self, n: u64) -> f64 {
        n as f64 / self.steps as f64
    }
}

pub async fn run(
    scratch: &Path,
    steps: usize,
    change_steps: usize,
    rounds: usize,
    postgres: Option<&str>,
) -> Result<()> {
    let mut rows = vec![];
    let sqlite_home = scratch.join("sqlite");
    std::fs::create_dir_all(&sqlite_home).map_err(|e| bench_error(format!("scratch: {e}")))?;
    let configs: Vec<(String, Option<&str>, usize)> =
        std::iter::once(("SQLite, one process".to_owned(), None, 1))
            .chain(postgres.into_iter().flat_map(|url| {
                (1..=3).map(move |w| (format!("PostgreSQL, {w} worker(s)"), Some(url), w))
            }))
            .collect();
    if postgres.is_none() {
        eprintln!(
            "no --postgres URL: only the SQLite yardstick is measured (give a scratch PostgreSQL database to compare)"
        );
    }
    // Rounds go over every configuration in turn, and each figure is the median of its rounds: a busy machine's
    // slow moments fall on all configurations alike instead of on whichever was measured then.
    let mut runs: Vec<Vec<Row>> = configs.iter().map(|_| vec![]).collect();
    let mut commits = vec![];
    for _ in 0..rounds {
        for ((label, url, workers), runs) in configs.iter().zip(&mut runs) {
            let home = match url {
                None => sqlite_home.clone(),
                Some(_) => scratch.join(format!("pg{workers}")),
            };
            std::fs::create_dir_all(&home).map_err(|e| bench_error(format!("scratch: {e}")))?;
            if url.is_some() && *workers == 1 {
                commits.push(Duration::from_secs_f64(
                    commit_latency(&home, *url).await? / 1000.0,
                ));
            }
            runs.push(measure(label, &home, *url, *workers, steps, change_steps).await?);
        }
    }
    for mut runs in runs {
        runs.sort_by(|a, b| a.ms_per_step().total_cmp(&b.ms_per_step()));
        rows.push(runs.swap_remove(runs.len() / 2));
    }
    let commit_ms =
        (!commits.is_empty()).then(|| super::bench::median(commits).as_secs_f64() * 1000.0);
    println!(
        "store work of a step in a {change_steps}-step sequential change (change-level work spread over its steps); \
         median of {rounds} round(s); {} build",
        if cfg!(debug_assertions) {
            "DEBUG (figures are not representative: use a release build)"
        } else {
            "release"
        }
    );
    println!(
        "{:<28} {:>6} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10}",
        "store",
        "steps",
        "seconds",
        "steps/s",
        "ms/step",
        "vs SQLite",
        "stmts",
        "txns",
        "autocommit"
    );
    let base = rows[0].ms_per_step();
    for row in &rows {
        println!(
            "{:<28} {:>6} {:>8.2} {:>9.1} {:>9.2} {:>8.2}x {:>7.1} {:>9.1} {:>10.1}",
            row.label,
            row.steps,
            row.elapsed.as_secs_f64(),
            row.steps_per_second(),
            row.ms_per_step(),
            row.ms_per_step() / base,
            row.per_step(row.traffic.statements),
            row.per_step(row.traffic.commits),
            row.per_step(row.traffic.autocommits),
        );
    }
    println!(
        "(stmts, txns, autocommit: statements, transactions and stand-alone writes per step; SQLite's WAL at \
         synchronous=NORMAL does not flush to disk per commit, PostgreSQL does)"
    );
    if let Some(ms) = commit_ms {
        println!(
            "one durable commit on this PostgreSQL now (median of {PROBES} per round): {ms:.2} ms: most of a \
             step's store time is its commits times this"
        );
    }
    for row in rows.iter().filter(|r| r.postgres) {
        let ms = row.ms_per_step();
        println!(
            "goal <= {GOAL_MS} ms of store overhead per step on PostgreSQL, {} worker(s): {ms:.2} ms: {}",
            row.workers,
            if ms <= GOAL_MS { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// Durable commits timed by [`commit_latency`].
const PROBES: usize = 20;

/// The time one small durable write takes on the store `database` names (the median of [`PROBES`]): mostly the
/// server's flush of its write-ahead log to disk, which a busy disk makes slow.
async fn commit_latency(home: &Path, database: Option<&str>) -> Result<f64> {
    let store = Store::connect(home, database).await?;
    let owner = format!("bench-commit-probe-{}", uuid::Uuid::new_v4().simple());
    let mut samples = vec![];
    for _ in 0..=PROBES {
        let started = Instant::now();
        store
            .renew_lease_for(&owner, "bench", std::process::id(), Duration::from_secs(60))
            .await?;
        samples.push(started.elapsed());
    }
    store.drop_lease(&owner).await?;
    store.close().await;
    // The first opened the connection.
    samples.remove(0);
    Ok(super::bench::median(samples).as_secs_f64() * 1000.0)
}

/// `workers` workers, each with its own store (connection pool) and environment, run `steps` steps in all, in
/// changes of `change_steps` steps.
async fn measure(
    label: &str,
    home: &Path,
    database: Option<&str>,
    workers: usize,
    steps: usize,
    change_steps: usize,
) -> Result<Row> {
    let setup = Store::connect(home, database).await?;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let project = format!("bench-{tag}");
    setup.create_project(&project, "Bench", None).await?;
    for w in 0..workers {
        setup
            .create_environment(&project, &format!("w{w}"), "Worker")
            .await?;
    }
    let mut stores = vec![];
    for _ in 0..workers {
        let store = Store::connect(home, database).await?;
        // One untimed change warms each pool's connections and prepared statements, as a running worker has them.
        worker(
            &store,
            &project,
            &format!("w{}", stores.len()),
            1,
            change_steps,
        )
        .await?;
        stores.push(store);
    }
    let changes_per_worker = steps.div_ceil(workers * change_steps).max(1);
    let before = crate::store::traffic();
    let started = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            let project = project.clone();
            tokio::spawn(async move {
                let env = format!("w{w}");
                let result = worker(&store, &project, &env, changes_per_worker, change_steps).await;
                store.close().await;
                result
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| bench_error(format!("a bench worker panicked: {e}")))??;
    }
    let elapsed = started.elapsed();
    let traffic = crate::store::traffic() - before;
    setup.close().await;
    Ok(Row {
        label: label.to_owned(),
        postgres: database.is_some(),
        workers,
        steps: changes_per_worker * change_steps * workers,
        elapsed,
        traffic,
    })
}

/// Claims the next ready step of the bench's own change.
async fn claim(store: &Store, owner: &str, id: &str) -> Result<crate::store::ClaimedStep> {
    store
        .claim_step(owner, crate::store::ClaimScope::Change(id))
        .await?
        .ok_or_else(|| bench_error(format!("change {id} had no ready step")))
}

/// Runs `changes` changes of `change_steps` sequential steps on `environment`, doing the store work the
/// orchestrator does for them.
async fn worker(
    store: &Store,
    project: &str,
    environment: &str,
    changes: usize,
    change_steps: usize,
) -> Result<()> {
    let p = store.project(project).await?;
    let e = store.environment(project, environment).await?;
    let env_owner = PropertiesOwner::from(&e);
    let owner = format!("bench-{environment}-{}", std::process::id());
    for c in 0..changes {
        let id = uuid::Uuid::new_v4().to_string();
        let root = uuid::Uuid::new_v4().to_string();
        store
            .create_change(&NewChange {
                id: &id,
                project_id: p.id,
                environment_id: e.id,
                action: "deploy",
                git_rev: "main",
                git_sha: "0000000000000000000000000000000000000000",
                root_step_id: &root,
                owner: &owner,
                labels: &Default::default(),
            })
            .await?;
        store.queue_change(&id, &owner).await?;
        if store.claim_environment(&id, &owner).await? != Claim::Claimed {
            return Err(bench_error(format!(
                "change {id} could not take its own environment"
            )));
        }
        store
            .append_event(
                &id,
                &Event::ChangeState {
                    state: ChangeState::Running,
                    reason: None,
                },
            )
            .await?;
        // The root's own work records its children, run one after the other.
        let children: Vec<NewStep> = (0..change_steps)
            .map(|n| NewStep {
                id: uuid::Uuid::new_v4().to_string(),
                action: format!("part{n}"),
                ignore_failure: false,
                retry_on_worker_loss: false,
            })
            .collect();
        // A claim reads the property versions the step starts from and records its running state.
        let claimed = claim(store, &owner, &id).await?;
        let settle = StepSettle {
            change_id: &id,
            step_id: &root,
            claim: &claimed.claim,
            exit_code: Some(0),
            properties: None,
            children: Some(("sequential", &children)),
        };
        let by = WrittenBy::Change {
            change_id: id.clone(),
            step_id: root.clone(),
        };
        store.settle_step(&settle, &[], &by).await?;
        for (
            n,
            NewStep {
                id: step, action, ..
            },
        ) in children.iter().enumerate()
        {
            // The claim takes the step (its running state, the property versions it starts from).
            let claimed = claim(store, &owner, &id).await?;
            if &claimed.step.id != step {
                return Err(bench_error(format!(
                    "step {action} of change {id} was not the next ready"
                )));
            }
            // One recorder flush: the step's phases and its output.
            let mut batch = Vec::new();
            batch.extend(
                [Phase::BuildStarted, Phase::BuildFinished, Phase::RunStarted]
                    .into_iter()
                    .map(|phase| {
                        event(Event::Phase {
                            step_id: step.clone(),
                            phase,
                            message: String::new(),
                        })
                    }),
            );
            batch.push(lines(step, c * change_steps + n));
            store.append_batch(&id, &batch).await?;
            // Its patch, based on the version it read, lands with its end.
            let current = store.properties(&env_owner, None).await?;
            let doc = serde_json::json!({ "last": n, "by": environment });
            let settle = StepSettle {
                change_id: &id,
                step_id: step,
                claim: &claimed.claim,
                exit_code: Some(0),
                properties: None,
                children: None,
            };
            let by = WrittenBy::Change {
                change_id: id.clone(),
                step_id: step.clone(),
            };
            let writes = [PropertiesWrite {
                owner: &env_owner,
                expected_version: current.version,
                document: &doc,
            }];
            // Its end lands with its patch and the tree's next step (after the last: the root's and the change's
            // end), in one transaction.
            store.settle_step(&settle, &writes, &by).await?;
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    crate::orchestrator::lease::now_ms()
}

fn event(event: Event) -> BatchEntry {
    BatchEntry::Event {
        event,
        at: crate::store::rfc3339_ms(now_ms()),
    }
}

/// A chunk of output lines of a typical length.
fn lines(step: &str, n: usize) -> BatchEntry {
    let lines: Vec<ChunkLine> = (0..LINES_PER_STEP)
        .map(|l| ChunkLine {
            step_id: step.to_owned(),
            stream: Stream::Stdout,
            at_ms: now_ms(),
            line: format!("step {n} line {l}: some output of a typical length for a deploy script"),
        })
        .collect();
    BatchEntry::Lines {
        count: lines.len() as i64,
        first_at: lines[0].at_ms,
        last_at: lines[lines.len() - 1].at_ms,
        text_bytes: lines.iter().map(|l| l.line.len() as i64 + 1).sum(),
        chunk: chunk::encode(&lines),
    }
}
