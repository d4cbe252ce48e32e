//! The fleet's shared queue: changes created with no owner (`runner change create --enqueue`, or any host's
//! client against a store workers serve) wait `pending` until a worker starts one. A worker starts only the change
//! whose turn it is on its environment (nothing running there, nothing created earlier still waiting): in one
//! transaction the change becomes `running` — still owned by nobody — and its first steps `ready`, for any worker
//! to claim (see [`claims`](super::claims)). On PostgreSQL the candidate row is taken `FOR UPDATE SKIP LOCKED`, so
//! concurrent workers pass over each other's candidates, and the partial unique index on running changes per
//! environment refuses a second running change should two workers start changes of one environment at once.

use super::db::{query, Backend};
use super::transitions::insert_event;
use super::{now, Store, StoreError};
use crate::events::{ChangeState, Event, EventRecord};

/// Changes no owner holds, oldest first, whose environment is free for them.
const STARTABLE: &str = "SELECT c.id FROM changes c \
     WHERE c.state = 'pending' AND c.owner IS NULL AND c.cancel_requested = 0 \
       AND NOT EXISTS (SELECT 1 FROM changes o WHERE o.environment_id = c.environment_id AND o.id != c.id \
         AND (o.state = 'running' \
           OR (o.state IN ('pending', 'queued') AND (o.created_at, o.rowid) < (c.created_at, c.rowid)))) \
     ORDER BY c.created_at, c.rowid LIMIT 1";

/// A fleet change a worker started.
#[derive(Debug, Clone, PartialEq)]
pub struct StartedChange {
    pub id: String,
    /// Its `queued` and `running` events (and, should nothing be left to run, its end), for live watchers.
    pub events: Vec<EventRecord>,
}

impl Store {
    /// Starts the oldest unowned change whose environment is free: `running`, its first steps ready. `None` when
    /// there is none (or another worker started it first).
    pub async fn start_fleet_change(&self) -> Result<Option<StartedChange>, StoreError> {
        let mut tx = self.pool.row_tx().await?;
        let sql = match self.backend() {
            Backend::Postgres => format!("{STARTABLE} FOR UPDATE OF c SKIP LOCKED"),
            Backend::Sqlite => STARTABLE.to_owned(),
        };
        let Some(row) = query(sql).fetch_optional(&mut tx).await? else {
            return Ok(None);
        };
        let id: String = row.get(0);
        let started = query(
            "UPDATE changes SET state = 'running', started_at = COALESCE(started_at, ?) \
             WHERE id = ? AND owner IS NULL AND state = 'pending' AND cancel_requested = 0",
        )
        .bind(now())
        .bind(&id)
        .execute(&mut tx)
        .await;
        let started = match started {
            // Another worker started a change of this environment meanwhile: its turn, not this one's.
            Err(e) if super::is_unique_violation(&e) => return Ok(None),
            other => other?.rows_affected(),
        };
        if started != 1 {
            return Ok(None);
        }
        let mut events = Vec::new();
        for state in [ChangeState::Queued, ChangeState::Running] {
            let event = Event::ChangeState {
                state,
                reason: None,
            };
            events.push(insert_event(&mut tx, &id, &event).await?);
        }
        events.extend(super::claims::resume_in(&mut tx, &id).await?);
        tx.commit().await?;
        self.moved(&id);
        Ok(Some(StartedChange { id, events }))
    }
}
