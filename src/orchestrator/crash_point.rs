//! A test-only hook for the crash drill (`runner bench crash`, `tests/crash.rs`). When the environment variable
//! `RUNNER_CRASH_POINT` names a point this process reaches, it writes `crash point NAME reached` to stderr and
//! stops there (the task waits forever; the rest of the process, its lease and its containers live on), so the
//! drill can `kill -9` it at exactly that moment. Unset — always, outside the drill — it does nothing.
//!
//! Points: `queued`, `cloning`, `building`, `starting-services`, `running`, `applying-patches`, `between-steps`,
//! `cancelling`, `retrying`, `serve-watching`.

use std::sync::OnceLock;

/// The variable naming the point to stop at.
pub const VARIABLE: &str = "RUNNER_CRASH_POINT";

/// Stops here forever if the drill asked for `point`.
pub async fn reached(point: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var(VARIABLE).ok().filter(|p| !p.is_empty()));
    if wanted.as_deref() == Some(point) {
        eprintln!("crash point {point} reached");
        std::future::pending::<()>().await;
    }
}
