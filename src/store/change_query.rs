//! What API readers ask of changes: filtered pages in a stable order, continued from the last row seen (keyset
//! pagination: a change created between two pages never shifts the next one).

use super::changes::{change_row, CHANGE_SELECT};
use super::{Change, Store, StoreError};
use crate::events::ChangeState;

/// A filtered, ordered page of changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeQuery {
    pub project: Option<String>,
    pub environment: Option<String>,
    /// Any of these states (none: every state).
    pub states: Vec<ChangeState>,
    pub action: Option<String>,
    /// Every one of these labels.
    pub labels: Vec<(String, String)>,
    /// RFC 3339 bounds on `created_at` (exclusive).
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
}

/// Where the previous page ended: its last change's creation time and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyset {
    pub created_at: String,
    pub id: String,
}

impl Store {
    /// Up to `limit` changes matching `query`, after `after` in its order (creation time, then id).
    pub async fn query_changes(
        &self,
        query: &ChangeQuery,
        after: Option<&Keyset>,
        limit: i64,
    ) -> Result<Vec<Change>, StoreError> {
        let mut sql = format!("{CHANGE_SELECT} WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        let bind = |value: &str, binds: &mut Vec<String>| {
            binds.push(value.to_owned());
            format!("${}", binds.len())
        };
        if let Some(project) = &query.project {
            sql += &format!(" AND p.code = {}", bind(project, &mut binds));
        }
        if let Some(environment) = &query.environment {
            sql += &format!(" AND e.code = {}", bind(environment, &mut binds));
        }
        if !query.states.is_empty() {
            let states: Vec<String> = query
                .states
                .iter()
                .map(|s| bind(s.as_str(), &mut binds))
                .collect();
            sql += &format!(" AND c.state IN ({})", states.join(", "));
        }
        if let Some(action) = &query.action {
            sql += &format!(" AND c.action = {}", bind(action, &mut binds));
        }
        for (key, value) in &query.labels {
            let (k, v) = (bind(key, &mut binds), bind(value, &mut binds));
            sql += &format!(
                " AND EXISTS (SELECT 1 FROM change_labels l WHERE l.change_id = c.id AND l.key = {k} AND l.value = {v})"
            );
        }
        if let Some(after) = &query.created_after {
            sql += &format!(" AND c.created_at > {}", bind(after, &mut binds));
        }
        if let Some(before) = &query.created_before {
            sql += &format!(" AND c.created_at < {}", bind(before, &mut binds));
        }
        let (cmp, order) = if query.oldest_first {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        if let Some(keyset) = after {
            let (at, id) = (
                bind(&keyset.created_at, &mut binds),
                bind(&keyset.id, &mut binds),
            );
            sql += &format!(
                " AND (c.created_at {cmp} {at} OR (c.created_at = {at} AND c.id {cmp} {id}))"
            );
        }
        sql += &format!(
            " ORDER BY c.created_at {order}, c.id {order} LIMIT {}",
            limit.max(0)
        );
        let mut q = super::db::query(sql);
        for value in &binds {
            q = q.bind(value);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows.iter().map(change_row).collect())
    }
}
