//! `runner bench crash`: the crash drill ([`crate::drill`]) at every point, with this binary as the runner.

use std::path::Path;
use std::time::Duration;

use super::bench::bench_error;
use crate::drill::{Drill, POINTS};
use crate::error::Result;

pub async fn run(scratch: &Path, trials: usize, points: &[String]) -> Result<()> {
    let points: Vec<&str> = if points.is_empty() {
        POINTS.to_vec()
    } else {
        points.iter().map(String::as_str).collect()
    };
    let exe =
        std::env::current_exe().map_err(|e| bench_error(format!("which runner is this: {e}")))?;
    let drill = Drill::prepare(exe, &scratch.join("crash"))
        .await
        .map_err(|e| bench_error(e.to_string()))?;
    println!("crash drill: SIGKILL at each point, {trials} trial(s) each, then the next change on the environment");
    println!(
        "{:<18} {:>5} {:>10} {:>6} {:>10} {:<10} OUTCOME",
        "POINT", "TRIAL", "TO CRASH", "LEFT", "RECOVERY", "CHANGE"
    );
    let mut failed = 0;
    let mut recoveries = Vec::new();
    for point in &points {
        for trial in 1..=trials {
            let outcome = match drill.trial(point, trial).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    let _ = drill.clean_up().await;
                    return Err(bench_error(e.to_string()));
                }
            };
            recoveries.push(outcome.recovery);
            let ended = outcome
                .change
                .as_ref()
                .map(|(_, state, _)| state.to_string())
                .unwrap_or_else(|| "-".into());
            let verdict = if outcome.passed() {
                "ok".to_owned()
            } else {
                failed += 1;
                format!("FAILED: {}", outcome.problems.join("; "))
            };
            println!(
                "{:<18} {:>5} {:>10} {:>6} {:>10} {:<10} {verdict}",
                point,
                trial,
                secs(outcome.to_crash),
                outcome.left_at_crash,
                secs(outcome.recovery),
                ended
            );
        }
    }
    drill
        .clean_up()
        .await
        .map_err(|e| bench_error(e.to_string()))?;
    recoveries.sort();
    if let Some(median) = recoveries.get(recoveries.len() / 2) {
        println!(
            "{} trial(s), {failed} failed; recovery (restart, clean-up and the next change) median {}, max {}",
            recoveries.len(),
            secs(*median),
            secs(*recoveries.last().unwrap_or(median))
        );
    }
    if failed > 0 {
        return Err(bench_error(format!(
            "{failed} crash trial(s) broke an invariant"
        )));
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
