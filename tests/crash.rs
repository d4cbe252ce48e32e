//! The crash drill (`src/drill/`): `runner` is killed with SIGKILL at each of the ten crash points, twice; after a
//! restart nothing of it is left in Docker, every change ended (with a reason unless it succeeded), no properties
//! version holds half a patch, a step's patch is there exactly when the step succeeded, a cancel requested
//! before the crash ends the change `cancelled`, a client following through a killed server says how to
//! re-attach, and the next change on the same environment runs.

mod support;

use runner::drill::{Drill, POINTS};

const TRIALS: usize = 2;

#[tokio::test(flavor = "multi_thread")]
async fn every_crash_point_recovers_with_every_invariant_holding() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let dir = tempfile::tempdir().unwrap();
    let drill = Drill::prepare(env!("CARGO_BIN_EXE_runner").into(), dir.path())
        .await
        .expect("the drill's project is set up");
    let only = std::env::var("RUNNER_TEST_CRASH_POINTS").ok();
    let mut report = Vec::new();
    let mut failed = 0;
    for point in POINTS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|p| p == point))
        {
            continue;
        }
        for trial in 1..=TRIALS {
            let outcome = match drill.trial(point, trial).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    let _ = drill.clean_up().await;
                    panic!("{point} trial {trial}: the drill could not run: {e}")
                }
            };
            if !outcome.passed() {
                failed += 1;
            }
            report.push(format!(
                "{point} #{trial}: crash after {:.2?} with {} left in Docker, recovery {:.2?}, change {:?}: {}",
                outcome.to_crash,
                outcome.left_at_crash,
                outcome.recovery,
                outcome.change,
                if outcome.passed() {
                    "ok".to_owned()
                } else {
                    outcome.problems.join("\n    ")
                }
            ));
        }
    }
    drill
        .clean_up()
        .await
        .expect("the drill cleans up after itself");
    eprintln!("{}", report.join("\n"));
    assert_eq!(failed, 0, "{}", report.join("\n"));
}
