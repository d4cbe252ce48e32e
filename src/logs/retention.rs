//! Log retention: the lines of changes that ended long enough ago are deleted and their space given back, while
//! the changes, their steps and their other events stay. By hand (`runner logs prune --older-than 30d`) or
//! automatically (`RUNNER_LOG_RETENTION=30d`: when a runner starts, and hourly while `runner serve` runs).

use std::time::Duration;

use crate::store::{rfc3339_ms, Pruned, Store, StoreError};

/// How often `serve` applies the retention.
const EVERY: Duration = Duration::from_secs(3600);

/// Prunes the lines of changes that ended more than `age` ago.
pub async fn prune_older_than(store: &Store, age: Duration) -> Result<Pruned, StoreError> {
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let cutoff = chrono::Utc::now().timestamp_millis().saturating_sub(age_ms);
    store.prune_logs(&rfc3339_ms(cutoff)).await
}

/// Applies the retention now and then every hour, until the task is aborted.
pub fn keep_pruning(store: Store, age: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match prune_older_than(&store, age).await {
                Ok(p) if p.chunks > 0 => tracing::info!(
                    changes = p.changes,
                    bytes = p.text_bytes,
                    "pruned the logs of changes past the retention"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "failed to prune old logs"),
            }
            tokio::time::sleep(EVERY).await;
        }
    })
}
