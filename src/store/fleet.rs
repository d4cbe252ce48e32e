//! The fleet's shared queue: changes created with no owner (`runner change create --enqueue`, or any host's
//! client against a store workers serve) wait `pending` until a worker adopts one. A worker adopts only the
//! change whose turn it is on its environment (nothing running there, nothing created earlier still waiting), so
//! an adopted change is claimed at once and workers never sit on a blocked environment. Adoption is one
//! compare-and-set on `owner IS NULL`: of two workers reaching for the same change, one gets it. On PostgreSQL the
//! candidate row is taken `FOR UPDATE SKIP LOCKED`, so concurrent workers pass over each other's candidates
//! instead of queueing behind them, and no store-wide lock is taken.

use super::db::{query, Backend};
use super::{Store, StoreError};

/// Changes no owner holds, oldest first, whose environment is free for them.
const ADOPTABLE: &str = "SELECT c.id FROM changes c \
     WHERE c.state = 'pending' AND c.owner IS NULL AND c.cancel_requested = 0 \
       AND NOT EXISTS (SELECT 1 FROM changes o WHERE o.environment_id = c.environment_id AND o.id != c.id \
         AND (o.state = 'running' \
           OR (o.state IN ('pending', 'queued') AND (o.created_at, o.rowid) < (c.created_at, c.rowid)))) \
     ORDER BY c.created_at, c.rowid LIMIT 1";

impl Store {
    /// Makes `owner` (a worker) the owner of the oldest unowned change whose environment is free; `None` when
    /// there is none. The adopted change is `pending` and held by `owner`: it runs as a change its creator ran.
    pub async fn adopt_change(&self, owner: &str) -> Result<Option<String>, StoreError> {
        let mut tx = self.pool.row_tx().await?;
        let sql = match self.backend() {
            Backend::Postgres => format!("{ADOPTABLE} FOR UPDATE OF c SKIP LOCKED"),
            Backend::Sqlite => ADOPTABLE.to_owned(),
        };
        let Some(row) = query(sql).fetch_optional(&mut tx).await? else {
            return Ok(None);
        };
        let id: String = row.get(0);
        let adopted = query(
            "UPDATE changes SET owner = ? WHERE id = ? AND owner IS NULL AND state = 'pending' AND cancel_requested = 0",
        )
        .bind(owner)
        .bind(&id)
        .execute(&mut tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((adopted == 1).then_some(id))
    }
}
