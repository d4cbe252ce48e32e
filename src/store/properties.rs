//! Versioned properties: every write is a new version row; writes name the version they are based on.

use super::db::{query, LockedTable, Row, Tx};
use serde::Serialize;
use serde_json::Value;

use super::{now, Environment, Project, Store, StoreError};

/// Whose properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertiesOwner {
    Project {
        id: i64,
        code: String,
    },
    Environment {
        id: i64,
        project_code: String,
        code: String,
    },
}

impl PropertiesOwner {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PropertiesOwner::Project { .. } => "project",
            PropertiesOwner::Environment { .. } => "environment",
        }
    }
    pub(crate) fn id(&self) -> i64 {
        match self {
            PropertiesOwner::Project { id, .. } | PropertiesOwner::Environment { id, .. } => *id,
        }
    }
    /// The row whose lock orders the writers of these properties.
    fn row(&self) -> (LockedTable, i64) {
        match self {
            PropertiesOwner::Project { id, .. } => (LockedTable::Projects, *id),
            PropertiesOwner::Environment { id, .. } => (LockedTable::Environments, *id),
        }
    }
}

impl std::fmt::Display for PropertiesOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertiesOwner::Project { code, .. } => write!(f, "project {code:?}"),
            PropertiesOwner::Environment {
                project_code, code, ..
            } => write!(f, "environment {project_code:?}/{code:?}"),
        }
    }
}

impl From<&Project> for PropertiesOwner {
    fn from(p: &Project) -> Self {
        PropertiesOwner::Project {
            id: p.id,
            code: p.code.clone(),
        }
    }
}

impl From<&Environment> for PropertiesOwner {
    fn from(e: &Environment) -> Self {
        PropertiesOwner::Environment {
            id: e.id,
            project_code: e.project_code.clone(),
            code: e.code.clone(),
        }
    }
}

/// Who wrote a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum WrittenBy {
    Cli,
    Api,
    Change { change_id: String, step_id: String },
}

/// One stored version of a properties document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PropertiesVersion {
    pub version: i64,
    pub document: Value,
    pub written_at: String,
    pub written_by: WrittenBy,
}

/// A write based on `expected_version`.
#[derive(Debug, Clone)]
pub struct PropertiesWrite<'a> {
    pub owner: &'a PropertiesOwner,
    pub expected_version: i64,
    pub document: &'a Value,
}

pub(super) async fn insert_initial(tx: &mut Tx, kind: &str, id: i64) -> Result<(), StoreError> {
    query(
        "INSERT INTO property_versions (owner_kind, owner_id, version, document, written_at, written_by) \
         VALUES (?, ?, 1, '{}', ?, 'cli')",
    )
    .bind(kind)
    .bind(id)
    .bind(now())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn version_row(owner: &PropertiesOwner, row: &Row) -> Result<PropertiesVersion, StoreError> {
    let version: i64 = row.get("version");
    let document: String = row.get("document");
    let document = serde_json::from_str(&document).map_err(|source| StoreError::Corrupt {
        owner: owner.to_string(),
        version,
        source,
    })?;
    let written_by = match row.get::<String, _>("written_by").as_str() {
        "change" => WrittenBy::Change {
            change_id: row
                .get::<Option<String>, _>("change_id")
                .unwrap_or_default(),
            step_id: row.get::<Option<String>, _>("step_id").unwrap_or_default(),
        },
        "api" => WrittenBy::Api,
        _ => WrittenBy::Cli,
    };
    Ok(PropertiesVersion {
        version,
        document,
        written_at: row.get("written_at"),
        written_by,
    })
}

impl Store {
    /// The latest version, or version `version` when given.
    pub async fn properties(
        &self,
        owner: &PropertiesOwner,
        version: Option<i64>,
    ) -> Result<PropertiesVersion, StoreError> {
        let row = query(
            "SELECT * FROM property_versions WHERE owner_kind = ? AND owner_id = ? \
             AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1",
        )
        .bind(owner.kind())
        .bind(owner.id())
        .bind(version)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => version_row(owner, &row),
            None => Err(StoreError::NotFound {
                what: "properties version",
                code: version.map(|v| v.to_string()).unwrap_or_default(),
                hint: format!(
                    " for the {owner}: see `properties-history` for the versions that exist"
                ),
            }),
        }
    }

    /// Every version, oldest first.
    pub async fn properties_history(
        &self,
        owner: &PropertiesOwner,
    ) -> Result<Vec<PropertiesVersion>, StoreError> {
        let rows = query(
            "SELECT * FROM property_versions WHERE owner_kind = ? AND owner_id = ? ORDER BY version",
        )
        .bind(owner.kind())
        .bind(owner.id())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| version_row(owner, row)).collect()
    }

    /// Writes new versions of one or more documents in one transaction: all land or none does. Each write fails
    /// with [`StoreError::VersionConflict`] if its owner's current version is not the one it was based on.
    pub async fn write_properties(
        &self,
        writes: &[PropertiesWrite<'_>],
        by: &WrittenBy,
    ) -> Result<Vec<PropertiesVersion>, StoreError> {
        // The owners' rows order concurrent writers (see `write_in`): no store-wide lock.
        let mut tx = self.pool.row_tx().await?;
        let out = write_in(&mut tx, writes, by).await?;
        tx.commit().await?;
        Ok(out)
    }
}

/// [`Store::write_properties`] inside a transaction the caller commits (e.g. with a step's end).
///
/// Writers of one owner's properties queue on the owner's row (project or environment; locked in one order,
/// projects first, so two transactions writing the same owners never deadlock), then each write is one statement
/// that inserts version `expected + 1` only if the latest version is still `expected`. The primary key on
/// (owner, version) is the last word should two writers ever get past that.
pub(super) async fn write_in(
    tx: &mut Tx,
    writes: &[PropertiesWrite<'_>],
    by: &WrittenBy,
) -> Result<Vec<PropertiesVersion>, StoreError> {
    let texts: Vec<String> = writes.iter().map(|w| w.document.to_string()).collect();
    for (write, text) in writes.iter().zip(&texts) {
        if text.len() > crate::properties::MAX_DOCUMENT_BYTES {
            return Err(StoreError::TooLarge {
                owner: write.owner.to_string(),
                size: text.len(),
                limit: crate::properties::MAX_DOCUMENT_BYTES,
            });
        }
    }
    let mut rows: Vec<(LockedTable, i64)> = writes.iter().map(|w| w.owner.row()).collect();
    rows.sort();
    rows.dedup();
    for (table, id) in rows {
        tx.lock_row(table, id).await?;
    }
    let written_at = now();
    let (written_by, change_id, step_id) = match by {
        WrittenBy::Cli => ("cli", None, None),
        WrittenBy::Api => ("api", None, None),
        WrittenBy::Change { change_id, step_id } => ("change", Some(change_id), Some(step_id)),
    };
    let mut out = Vec::with_capacity(writes.len());
    for (write, text) in writes.iter().zip(texts) {
        let version = write.expected_version + 1;
        let inserted = query(
            "INSERT INTO property_versions \
             (owner_kind, owner_id, version, document, written_at, written_by, change_id, step_id) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE (SELECT COALESCE(MAX(version), 0) \
             FROM property_versions WHERE owner_kind = ?1 AND owner_id = ?2) = ?9",
        )
        .bind(write.owner.kind())
        .bind(write.owner.id())
        .bind(version)
        .bind(text)
        .bind(&written_at)
        .bind(written_by)
        .bind(change_id)
        .bind(step_id)
        .bind(write.expected_version)
        .execute(&mut *tx)
        .await;
        let conflict = |current| StoreError::VersionConflict {
            owner: write.owner.to_string(),
            expected: write.expected_version,
            current,
        };
        match inserted {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => {
                let current: i64 = query(
                    "SELECT COALESCE(MAX(version), 0) FROM property_versions WHERE owner_kind = ? AND owner_id = ?",
                )
                .bind(write.owner.kind())
                .bind(write.owner.id())
                .fetch_one(&mut *tx)
                .await?
                .get(0);
                return Err(conflict(current));
            }
            // Another writer took `version` (the transaction is spoilt, so the latest is not read again).
            Err(e) if super::is_unique_violation(&e) => return Err(conflict(version)),
            Err(e) => return Err(e.into()),
        }
        out.push(PropertiesVersion {
            version,
            document: write.document.clone(),
            written_at: written_at.clone(),
            written_by: by.clone(),
        });
    }
    Ok(out)
}
