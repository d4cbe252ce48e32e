//! `runner bench logs`: a step that prints N MB of 100-byte lines (hex of random bytes) on the real daemon, through the whole log
//! pipeline (mask, cap, batch, compress, store). For each size it prints the time from the step's process exit to
//! the change's end, how much the store grew per log byte, how long `runner change show-logs` takes to print it
//! all, and the process's peak RSS — beside the yardstick: writing (and reading back) the same bytes as a plain
//! file, measured in the same run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::bench::{bench_error, git};
use crate::app::App;
use crate::error::{Error, Result};
use crate::events::ChangeState;
use crate::orchestrator::CreateChange;

/// Every line the step prints is this long, newline included (150 000 lines for 15 MB, as in the issue).
const LINE: usize = 100;
/// The last line the action prints: the kernel's uptime when it ended (containers share the host's clock).
const EXIT_MARK: &str = "bench-exit-at";

pub async fn run(scratch: &Path, sizes: &[u64]) -> Result<()> {
    let repo = spew_repo(scratch, sizes)?;
    let home = scratch.join("home");
    let app = App::open(&home).await?;
    app.create_project("bench", "Bench", Some(&repo.to_string_lossy()))
        .await?;
    app.create_environment("bench", "env", "Env").await?;
    let orchestrator = crate::runtime::local(app).await?;
    let lease_stop = CancellationToken::new();
    let lease = orchestrator.hold_lease(lease_stop.clone()).await?;
    let exe = std::env::current_exe().map_err(|e| bench_error(format!("current exe: {e}")))?;

    // Warm up: the first change builds the step image, so build time is not counted below.
    let warm = CreateChange {
        project: "bench".into(),
        environment: "env".into(),
        git_rev: "main".into(),
        action: "spew_0".into(),
    };
    let change = orchestrator.create_change(&warm).await?;
    orchestrator
        .run_change(&change.id, CancellationToken::new())
        .await?;

    println!(
        "logs: a step printing N MB of {LINE}-byte lines; yardstick: the same bytes written to a file (fsync) and read back"
    );
    println!(
        "  {:>6}  {:>13}  {:>12}  {:>10}  {:>13}  {:>10}  {:>10}",
        "size",
        "exit -> end",
        "store/bytes",
        "show-logs",
        "(lines shown)",
        "file write",
        "file read"
    );
    for &mb in sizes {
        let bytes = mb * 1024 * 1024;
        let before = store_bytes(&home);
        let request = CreateChange {
            action: format!("spew_{mb}"),
            ..warm.clone()
        };
        let change = orchestrator.create_change(&request).await?;
        let change = orchestrator
            .run_change(&change.id, CancellationToken::new())
            .await?;
        let ended = uptime()?;
        if change.state != ChangeState::Success {
            return Err(bench_error(format!(
                "the bench change {} ended {}: {}",
                change.id,
                change.state,
                change.reason.unwrap_or_default()
            )));
        }
        let growth = store_bytes(&home).saturating_sub(before);

        let shown = scratch.join("shown.txt");
        let out = std::fs::File::create(&shown).map_err(|source| Error::Home {
            path: shown.clone(),
            source,
        })?;
        let start = Instant::now();
        let status = Command::new(&exe)
            .arg("--home")
            .arg(&home)
            .args(["change", "show-logs", &change.id])
            .stdout(out)
            .status()
            .map_err(|e| bench_error(format!("runner change show-logs: {e}")))?;
        let show = start.elapsed();
        if !status.success() {
            return Err(bench_error("runner change show-logs failed"));
        }
        let text = std::fs::read_to_string(&shown).map_err(|source| Error::Home {
            path: shown.clone(),
            source,
        })?;
        let exited = text
            .lines()
            .rev()
            .find_map(|l| l.split(EXIT_MARK).nth(1))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .ok_or_else(|| bench_error("the step's exit mark is missing from its log"))?;
        let lines = text.lines().filter(|l| l.len() >= LINE - 1).count();
        let (write, read) = file_yardstick(scratch, bytes as usize)?;
        println!(
            "  {:>4}MB  {:>11.2} s  {:>11.2}x  {:>8.3} s  {:>13}  {:>8.3} s  {:>8.3} s",
            mb,
            (ended - exited).max(0.0),
            growth as f64 / (bytes / LINE as u64 * LINE as u64) as f64,
            show.as_secs_f64(),
            lines,
            write.as_secs_f64(),
            read.as_secs_f64(),
        );
    }
    println!(
        "  peak RSS of this process {:.1} MB (goals: exit -> end <= 2 s for 15 MB, store <= 1.2x, show-logs <= 1 s)",
        peak_rss_mb()
    );
    lease_stop.cancel();
    let _ = lease.await;
    Ok(())
}

/// A repository with one action per size, `spew_N`, printing N MB of lines and then the exit mark.
fn spew_repo(scratch: &Path, sizes: &[u64]) -> Result<std::path::PathBuf> {
    let repo = scratch.join("repo");
    let dir = repo.join(".opschain");
    std::fs::create_dir_all(&dir).map_err(|source| Error::Home {
        path: dir.clone(),
        source,
    })?;
    let mut actions = serde_json::Map::new();
    for mb in std::iter::once(0).chain(sizes.iter().copied()) {
        let bytes = mb * 1024 * 1024;
        // Hex of random bytes: as hard to compress as real output gets (nothing to gain from repeated lines).
        let run = format!(
            "head -c {} /dev/urandom | od -An -tx1 -v -w33 ; echo {EXIT_MARK} $(cut -d' ' -f1 /proc/uptime)",
            bytes / LINE as u64 * 33
        );
        actions.insert(format!("spew_{mb}"), serde_json::json!({ "run": run }));
    }
    let manifest = serde_json::json!({ "actions": actions });
    std::fs::write(dir.join("actions.json"), manifest.to_string()).map_err(|source| {
        Error::Home {
            path: dir.clone(),
            source,
        }
    })?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "bench logs"])?;
    Ok(repo)
}

/// The store's files: the database and its write-ahead log.
fn store_bytes(home: &Path) -> u64 {
    ["runner.db", "runner.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(home.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Seconds since boot, the clock the step's exit mark uses too.
fn uptime() -> Result<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| bench_error("cannot read /proc/uptime"))
}

/// The same bytes as lines written to a file and synced, then read back.
fn file_yardstick(scratch: &Path, bytes: usize) -> Result<(Duration, Duration)> {
    use std::io::{Read, Write};
    let path = scratch.join("yardstick.log");
    let mut line = vec![b'0'; LINE];
    line[LINE - 1] = b'\n';
    let io = |source| Error::Home {
        path: path.clone(),
        source,
    };
    let start = Instant::now();
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
    for _ in 0..bytes / LINE {
        file.write_all(&line).map_err(io)?;
    }
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let write = start.elapsed();
    let start = Instant::now();
    let mut back = Vec::with_capacity(bytes);
    std::fs::File::open(&path)
        .map_err(io)?
        .read_to_end(&mut back)
        .map_err(io)?;
    let read = start.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok((write, read))
}

/// The process's peak resident set (VmHWM), from /proc.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
