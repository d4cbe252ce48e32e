//! `runner bench store`: what the store costs a step, on SQLite (one process, the default) and on a shared
//! PostgreSQL with 1, 2 and 3 concurrent writers (each its own connection pool, as separate worker processes have),
//! printed side by side. A step's store work is what the orchestrator writes for a one-step change: create it,
//! queue it, claim its environment, start the step, record its events and a chunk of log lines, settle it with a
//! property write, end the change. No container runs: this is the coordination cost a fleet adds to every step,
//! measured against the single-process SQLite yardstick in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use super::bench::bench_error;
use crate::error::Result;
use crate::events::{ChangeState, Event, Phase, StepState};
use crate::executor::Stream;
use crate::logs::chunk::{self, ChunkLine};
use crate::store::{
    BatchEntry, Claim, NewChange, PropertiesOwner, PropertiesWrite, StepSettle, Store, WrittenBy,
};

/// One measured configuration.
struct Row {
    label: String,
    workers: usize,
    steps: usize,
    elapsed: Duration,
}

impl Row {
    fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.elapsed.as_secs_f64()
    }
    /// Store time one step costs the worker that runs it.
    fn ms_per_step(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1000.0 * self.workers as f64 / self.steps as f64
    }
}

pub async fn run(scratch: &Path, steps: usize, postgres: Option<&str>) -> Result<()> {
    let mut rows = vec![];
    let sqlite_home = scratch.join("sqlite");
    std::fs::create_dir_all(&sqlite_home).map_err(|e| bench_error(format!("scratch: {e}")))?;
    rows.push(measure("SQLite, one process", &sqlite_home, None, 1, steps).await?);
    match postgres {
        Some(url) => {
            for workers in 1..=3 {
                let home = scratch.join(format!("pg{workers}"));
                std::fs::create_dir_all(&home)
                    .map_err(|e| bench_error(format!("scratch: {e}")))?;
                rows.push(
                    measure(
                        &format!("PostgreSQL, {workers} worker(s)"),
                        &home,
                        Some(url),
                        workers,
                        steps,
                    )
                    .await?,
                );
            }
        }
        None => eprintln!(
            "no --postgres URL: only the SQLite yardstick is measured (give a scratch PostgreSQL database to compare)"
        ),
    }
    let base = rows[0].steps_per_second();
    println!(
        "{:<28} {:>7} {:>9} {:>10} {:>12} {:>9}",
        "store", "steps", "seconds", "steps/s", "ms/step", "vs SQLite"
    );
    for row in &rows {
        println!(
            "{:<28} {:>7} {:>9.2} {:>10.1} {:>12.2} {:>8.2}x",
            row.label,
            row.steps,
            row.elapsed.as_secs_f64(),
            row.steps_per_second(),
            row.ms_per_step(),
            row.steps_per_second() / base
        );
    }
    if let Some(pg) = rows.get(1) {
        let goal = 10.0;
        println!(
            "store overhead per step on PostgreSQL (one worker): {:.2} ms (goal <= {goal} ms): {}",
            pg.ms_per_step(),
            if pg.ms_per_step() <= goal {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    Ok(())
}

/// `workers` writers, each with its own store (connection pool) and environment, run `steps` one-step changes in
/// all.
async fn measure(
    label: &str,
    home: &Path,
    database: Option<&str>,
    workers: usize,
    steps: usize,
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
        stores.push(Store::connect(home, database).await?);
    }
    let per_worker = steps.div_ceil(workers);
    let started = Instant::now();
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            let project = project.clone();
            tokio::spawn(async move {
                let result = worker(&store, &project, &format!("w{w}"), per_worker).await;
                store.close().await;
                result
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| bench_error(format!("a bench writer panicked: {e}")))??;
    }
    let elapsed = started.elapsed();
    setup.close().await;
    Ok(Row {
        label: label.to_owned(),
        workers,
        steps: per_worker * workers,
        elapsed,
    })
}

async fn worker(store: &Store, project: &str, environment: &str, steps: usize) -> Result<()> {
    let p = store.project(project).await?;
    let e = store.environment(project, environment).await?;
    let owner_of_env = PropertiesOwner::from(&e);
    let owner = format!("bench-{environment}-{}", std::process::id());
    for i in 0..steps {
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
        let props = store.properties(&owner_of_env, None).await?;
        store.start_step(&root, &owner, 1, props.version).await?;
        let lines: Vec<ChunkLine> = (0..20)
            .map(|n| ChunkLine {
                step_id: root.clone(),
                stream: Stream::Stdout,
                at_ms: crate::orchestrator::lease::now_ms(),
                line: format!(
                    "step {i} line {n}: some output of a typical length for a deploy script"
                ),
            })
            .collect();
        let text_bytes = lines.iter().map(|l| l.line.len() as i64 + 1).sum();
        let at = crate::store::rfc3339_ms(crate::orchestrator::lease::now_ms());
        let mut batch: Vec<BatchEntry> =
            [Phase::BuildStarted, Phase::BuildFinished, Phase::RunStarted]
                .into_iter()
                .map(|phase| BatchEntry::Event {
                    event: Event::Phase {
                        step_id: root.clone(),
                        phase,
                        message: String::new(),
                    },
                    at: at.clone(),
                })
                .collect();
        batch.push(BatchEntry::Lines {
            count: lines.len() as i64,
            first_at: lines[0].at_ms,
            last_at: lines[lines.len() - 1].at_ms,
            text_bytes,
            chunk: chunk::encode(&lines),
        });
        store.append_batch(&id, &batch).await?;
        let doc = serde_json::json!({ "last": i, "by": environment });
        store
            .settle_step(
                &StepSettle {
                    change_id: &id,
                    step_id: &root,
                    owner: &owner,
                    exit_code: Some(0),
                    properties: None,
                    children: None,
                },
                &[PropertiesWrite {
                    owner: &owner_of_env,
                    expected_version: props.version,
                    document: &doc,
                }],
                &WrittenBy::Change {
                    change_id: id.clone(),
                    step_id: root.clone(),
                },
            )
            .await?;
        store
            .append_event(
                &id,
                &Event::StepState {
                    step_id: root.clone(),
                    parent_id: None,
                    action: "deploy".into(),
                    state: StepState::Success,
                    reason: None,
                },
            )
            .await?;
        store
            .finish_change(&id, &owner, ChangeState::Success, None)
            .await?;
        store
            .append_event(
                &id,
                &Event::ChangeState {
                    state: ChangeState::Success,
                    reason: None,
                },
            )
            .await?;
    }
    Ok(())
}
