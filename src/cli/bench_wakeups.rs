//! `runner bench wakeups`: how soon a follower learns that an event was stored. Followers wait on the store's
//! wake-ups (`store::wakeups`): on SQLite the in-process signal of the writer, on PostgreSQL a notification
//! (LISTEN/NOTIFY) from a writer with its own connection pool, as another process or host has. Beside each, the
//! yardstick is polling at the 200 ms interval followers used before, measured in the same run on the same store.
//! The time is from just before the writer stores the event to the follower's wake-up, so it includes the write.

use std::path::Path;
use std::time::{Duration, Instant};

use super::bench::bench_error;
use crate::error::Result;
use crate::events::{Event, Phase};
use crate::store::{NewChange, Store, Woke};

/// The poll interval followers used before wake-ups.
const POLL: Duration = Duration::from_millis(200);
/// A wake-up that takes longer than this is counted as lost.
const LOST: Duration = Duration::from_secs(10);

/// One measured way of waking.
struct Row {
    label: String,
    samples: Vec<Duration>,
    lost: usize,
}

impl Row {
    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(LOST)
    }
}

pub async fn run(scratch: &Path, trials: usize, postgres: Option<&str>) -> Result<()> {
    let mut pairs = vec![];
    let sqlite_home = scratch.join("sqlite");
    std::fs::create_dir_all(&sqlite_home).map_err(|e| bench_error(format!("scratch: {e}")))?;
    let sqlite = Store::connect(&sqlite_home, None).await?;
    // SQLite: the writer is this process (a clone of the follower's handle).
    pairs.push(measure("SQLite", &sqlite, &sqlite.clone(), trials).await?);
    sqlite.close().await;
    match postgres {
        Some(url) => {
            let home = scratch.join("pg");
            std::fs::create_dir_all(&home).map_err(|e| bench_error(format!("scratch: {e}")))?;
            let follower = Store::connect(&home, Some(url)).await?;
            // Another handle, its own pool: as a worker in another process writes.
            let writer = Store::connect(&home, Some(url)).await?;
            pairs.push(measure("PostgreSQL", &follower, &writer, trials).await?);
            follower.close().await;
            writer.close().await;
        }
        None => eprintln!(
            "no --postgres URL: only SQLite is measured (give a scratch PostgreSQL database to compare)"
        ),
    }
    println!(
        "{:<48} {:>7} {:>11} {:>11} {:>5}",
        "follower woken by", "trials", "median ms", "p95 ms", "lost"
    );
    for (woken, polled) in &pairs {
        for row in [woken, polled] {
            println!(
                "{:<48} {:>7} {:>11.2} {:>11.2} {:>5}",
                row.label,
                row.samples.len() + row.lost,
                ms(row.quantile(0.5)),
                ms(row.quantile(0.95)),
                row.lost
            );
        }
        println!(
            "{}: the wake-up comes {:.0}x sooner than the {} ms poll (median)",
            woken.label,
            ms(polled.quantile(0.5)) / ms(woken.quantile(0.5)).max(0.001),
            POLL.as_millis()
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `trials` events stored by `writer` on one change, each timed until `follower` learns of it: by the store's
/// wake-up, then by polling.
async fn measure(
    backend: &str,
    follower: &Store,
    writer: &Store,
    trials: usize,
) -> Result<(Row, Row)> {
    let change = bench_change(writer).await?;
    let event = Event::Phase {
        step_id: format!("{change}-root"),
        phase: Phase::RunStarted,
        message: "bench".into(),
    };
    let woken_label = match backend {
        "SQLite" => "SQLite, in-process signal".to_owned(),
        _ => format!("{backend}, NOTIFY from another connection pool"),
    };
    let mut woken = Row {
        label: woken_label,
        samples: vec![],
        lost: 0,
    };
    let mut signal = follower.change_signal(&change).await;
    for _ in 0..trials {
        let started = Instant::now();
        writer.append_event(&change, &event).await?;
        match signal.wait_at_most(LOST).await {
            Woke::Notified => woken.samples.push(started.elapsed()),
            Woke::Fallback => woken.lost += 1,
        }
    }

    let mut polled = Row {
        label: format!("{backend}, poll every {} ms", POLL.as_millis()),
        samples: vec![],
        lost: 0,
    };
    // The poller runs on its own clock; each event is stored at a random point of its interval.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let poller = {
        let (store, change) = (follower.clone(), change.clone());
        tokio::spawn(async move {
            let mut last = store.last_seq(&change).await.unwrap_or(0);
            loop {
                tokio::time::sleep(POLL).await;
                if let Ok(now) = store.last_seq(&change).await {
                    if now > last {
                        last = now;
                        if seen_tx.send(Instant::now()).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    for _ in 0..trials {
        let offset = (uuid::Uuid::new_v4().as_u128() % POLL.as_millis()) as u64;
        tokio::time::sleep(Duration::from_millis(offset)).await;
        let started = Instant::now();
        writer.append_event(&change, &event).await?;
        match tokio::time::timeout(LOST, seen_rx.recv()).await {
            Ok(Some(seen)) => polled.samples.push(seen.duration_since(started)),
            _ => polled.lost += 1,
        }
    }
    poller.abort();
    Ok((woken, polled))
}

/// A change to store the bench's events in, in a project of its own.
async fn bench_change(store: &Store) -> Result<String> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let project = store
        .create_project(&format!("bench-wake-{tag}"), "Bench", None)
        .await?;
    let environment = store
        .create_environment(&project.code, "dev", "Dev")
        .await?;
    let id = uuid::Uuid::new_v4().to_string();
    store
        .create_change(&NewChange {
            id: &id,
            project_id: project.id,
            environment_id: environment.id,
            action: "bench",
            git_rev: "main",
            git_sha: "0000000000000000000000000000000000000000",
            root_step_id: &format!("{id}-root"),
            owner: "bench",
            labels: &Default::default(),
        })
        .await?;
    Ok(id)
}
