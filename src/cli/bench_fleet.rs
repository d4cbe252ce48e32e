//! `runner bench fleet`: a fleet end to end. The same one-step changes (each on its own environment) are queued
//! and run by `runner worker` processes, each with its own data directory: one worker on SQLite (the yardstick: a
//! single host as today), then 1, 2 and 3 workers sharing a PostgreSQL store; changes per second side by side.
//! Every configuration first runs an untimed warm-up round (one change per worker slot), so each worker's step
//! image is built and its mirror fetched before the clock starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::bench::{bench_error, git};
use crate::app::App;
use crate::error::Result;
use crate::orchestrator::CreateChange;

struct Row {
    label: String,
    workers: usize,
    changes: usize,
    elapsed: Duration,
}

impl Row {
    fn per_second(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64()
    }
}

pub async fn run(
    scratch: &Path,
    changes: usize,
    parallel: usize,
    postgres: Option<&str>,
) -> Result<()> {
    let repo = scratch.join("repo");
    std::fs::create_dir_all(repo.join(".opschain"))
        .map_err(|e| bench_error(format!("scratch: {e}")))?;
    std::fs::write(
        repo.join(".opschain/actions.json"),
        r#"{"actions": {"noop": {"description": "One trivial step.", "run": "true"}}}"#,
    )
    .map_err(|e| bench_error(format!("scratch: {e}")))?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "bench fleet"])?;
    let mut rows = vec![measure(scratch, &repo, None, 1, changes, parallel).await?];
    match postgres {
        Some(url) => {
            for workers in 1..=3 {
                rows.push(measure(scratch, &repo, Some(url), workers, changes, parallel).await?);
            }
        }
        None => eprintln!(
            "no --postgres URL: only the SQLite yardstick is measured (give a scratch PostgreSQL database to compare)"
        ),
    }
    let base = rows[0].per_second();
    println!(
        "{:<30} {:>8} {:>8} {:>9} {:>10} {:>10}",
        "store", "workers", "changes", "seconds", "changes/s", "vs SQLite"
    );
    for row in &rows {
        println!(
            "{:<30} {:>8} {:>8} {:>9.2} {:>10.2} {:>9.2}x",
            row.label,
            row.workers,
            row.changes,
            row.elapsed.as_secs_f64(),
            row.per_second(),
            row.per_second() / base
        );
    }
    println!(
        "(one-step changes, {parallel} at once per worker; each worker has its own data directory)"
    );
    Ok(())
}

/// Worker processes, stopped (SIGTERM, then waited for) when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &self.0 {
            // SAFETY: signals a child process this bench started and still holds.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

async fn measure(
    scratch: &Path,
    repo: &Path,
    database: Option<&str>,
    workers: usize,
    changes: usize,
    parallel: usize,
) -> Result<Row> {
    let (label, tag) = match database {
        None => ("SQLite, one worker".to_owned(), "sqlite".to_owned()),
        Some(_) => (
            format!("PostgreSQL, {workers} worker(s)"),
            format!("pg{workers}"),
        ),
    };
    let admin_home = scratch.join(format!("{tag}-admin"));
    let homes: Vec<PathBuf> = match database {
        // On SQLite the worker and the queue share the one data directory.
        None => vec![admin_home.clone()],
        Some(_) => (0..workers)
            .map(|w| scratch.join(format!("{tag}-worker{w}")))
            .collect(),
    };
    let policy = crate::policy::Policy::load(&admin_home)?;
    let app = App::open_with_store(&admin_home, policy, database).await?;
    let project = format!(
        "bench-fleet-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    app.create_project(&project, "Bench fleet", Some(&repo.to_string_lossy()))
        .await?;
    let warm_up = workers * parallel;
    for e in 0..changes.max(warm_up) {
        app.create_environment(&project, &format!("e{e}"), "Bench")
            .await?;
    }
    let exe =
        std::env::current_exe().map_err(|e| bench_error(format!("which runner is this: {e}")))?;
    let mut running = Workers(vec![]);
    for home in &homes {
        std::fs::create_dir_all(home).map_err(|e| bench_error(format!("scratch: {e}")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--parallel", &parallel.to_string()])
            .env("RUNNER_HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match database {
            Some(url) => cmd.env("RUNNER_DATABASE_URL", url),
            None => cmd.env_remove("RUNNER_DATABASE_URL"),
        };
        running.0.push(
            cmd.spawn()
                .map_err(|e| bench_error(format!("runner worker: {e}")))?,
        );
    }
    let orchestrator = crate::runtime::offline(app)?;
    let round = |n: usize| {
        let (orchestrator, project) = (orchestrator.clone(), project.clone());
        async move {
            let mut ids = vec![];
            for e in 0..n {
                let change = orchestrator
                    .enqueue_change(&CreateChange {
                        project: project.clone(),
                        environment: format!("e{e}"),
                        git_rev: "main".into(),
                        action: "noop".into(),
                    })
                    .await?;
                ids.push(change.id);
            }
            let deadline = Instant::now() + Duration::from_secs(600);
            for id in &ids {
                loop {
                    let change = orchestrator.app().store.change(id).await?;
                    if change.state.is_final() {
                        if change.state != crate::events::ChangeState::Success {
                            return Err(bench_error(format!(
                                "change {id} ended {}: {}",
                                change.state,
                                change.reason.unwrap_or_default()
                            )));
                        }
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(bench_error(format!(
                            "change {id} did not end in 10 minutes"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok::<_, crate::error::Error>(())
        }
    };
    round(warm_up).await?;
    let started = Instant::now();
    round(changes).await?;
    let elapsed = started.elapsed();
    drop(running);
    Ok(Row {
        label,
        workers,
        changes,
        elapsed,
    })
}
