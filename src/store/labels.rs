//! A scheduler's labels on changes: set once, with the change, and read back with it.

use super::db::{query, Tx};
use std::collections::{BTreeMap, HashMap};

use super::{Store, StoreError};

/// Labels, in key order.
pub type Labels = BTreeMap<String, String>;

/// Records `labels` of a change in the transaction that creates it.
pub(super) async fn insert_labels(
    tx: &mut Tx,
    change_id: &str,
    labels: &Labels,
) -> Result<(), StoreError> {
    for (key, value) in labels {
        query("INSERT INTO change_labels (change_id, key, value) VALUES ($1, $2, $3)")
            .bind(change_id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

impl Store {
    /// The labels of each of `change_ids` (a change without labels maps to none).
    pub async fn change_labels(
        &self,
        change_ids: &[String],
    ) -> Result<HashMap<String, Labels>, StoreError> {
        let mut all: HashMap<String, Labels> = HashMap::new();
        for id in change_ids {
            let rows =
                query("SELECT key, value FROM change_labels WHERE change_id = $1 ORDER BY key")
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await?;
            let labels = all.entry(id.clone()).or_default();
            for row in rows {
                labels.insert(row.get(0), row.get(1));
            }
        }
        Ok(all)
    }
}
