//! Reads of the web view: changes filtered by state as well, counts for the metrics, and which property versions
//! a step wrote. Portable SQL (`$n` placeholders) so another backend can run the same text.

use super::db::query;

use super::changes::{change_row, CHANGE_SELECT};
use super::{Change, Store, StoreError};
use crate::events::ChangeState;

/// Filter of the web's changes list: project, environment and state, a page of it.
#[derive(Debug, Clone, Default)]
pub struct WebChangeFilter {
    pub project: Option<String>,
    pub environment: Option<String>,
    pub state: Option<ChangeState>,
    pub limit: i64,
    pub offset: i64,
}

/// A property version a step wrote: whose (`project` or `environment`) and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenVersion {
    pub owner_kind: String,
    pub version: i64,
}

impl Store {
    /// Changes matching `filter`, newest first.
    pub async fn web_changes(&self, filter: &WebChangeFilter) -> Result<Vec<Change>, StoreError> {
        let rows = query(format!(
            "{CHANGE_SELECT} WHERE ($1 IS NULL OR p.code = $1) AND ($2 IS NULL OR e.code = $2) \
             AND ($3 IS NULL OR c.state = $3) ORDER BY c.created_at DESC, c.id DESC LIMIT $4 OFFSET $5"
        ))
        .bind(&filter.project)
        .bind(&filter.environment)
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.limit.max(0))
        .bind(filter.offset.max(0))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// How many changes are in each state (states with none are absent).
    pub async fn change_counts(&self) -> Result<Vec<(ChangeState, i64)>, StoreError> {
        let rows = query("SELECT state, COUNT(*) AS n FROM changes GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((ChangeState::parse(r.get("state"))?, r.get("n"))))
            .collect())
    }

    /// Steps running now that run a container themselves (not groups of children).
    pub async fn running_containers(&self) -> Result<i64, StoreError> {
        Ok(query(
            "SELECT COUNT(*) FROM steps s WHERE s.state = 'running' \
             AND NOT EXISTS (SELECT 1 FROM steps c WHERE c.parent_id = s.id)",
        )
        .fetch_one(&self.pool)
        .await?
        .get(0))
    }

    /// The property versions step `step_id` wrote (its patches), project first.
    pub async fn versions_written_by(
        &self,
        step_id: &str,
    ) -> Result<Vec<WrittenVersion>, StoreError> {
        let rows = query(
            "SELECT owner_kind, version FROM property_versions WHERE step_id = $1 \
             ORDER BY owner_kind DESC, version",
        )
        .bind(step_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| WrittenVersion {
                owner_kind: r.get("owner_kind"),
                version: r.get("version"),
            })
            .collect())
    }

    /// Whether the store answers a query now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }
}
