//! The persistent store: projects, environments, versioned properties (and, later, changes and steps).
//!
//! All SQL lives below this module; callers see typed records. SQLite is the embedded default; the SQL is kept
//! to what PostgreSQL also speaks so the pool type is the only thing to swap.

mod base_images;
mod change_query;
mod changes;
mod labels;
mod logs;
mod projects;
mod properties;
mod requests;
mod transitions;
mod web;

pub use base_images::{BaseImageSetting, BaseImageSource};
pub use change_query::{ChangeQuery, Keyset};
pub use changes::{Change, ChangeFilter, NewChange, Step, StepFinish};
pub use labels::Labels;
pub use logs::{rfc3339_ms, BatchEntry, Pruned};
pub use projects::{Environment, Project};
pub use properties::{PropertiesOwner, PropertiesVersion, PropertiesWrite, WrittenBy};
pub use requests::{RequestClaim, ABANDONED_AFTER, REQUEST_ID_WINDOW};
pub use transitions::{Claim, ReapedChange, StepSettle, Transition, Verdict};
pub use web::{WebChangeFilter, WrittenVersion};

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::SqlitePool;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Store failures. `NotFound`, `AlreadyExists` and `VersionConflict` are the caller's to act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to migrate the store schema")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("{what} {code:?} does not exist{hint}")]
    NotFound {
        what: &'static str,
        code: String,
        hint: String,
    },
    #[error("{what} {code:?} already exists")]
    AlreadyExists { what: &'static str, code: String },
    #[error("version conflict on the {owner} properties: expected version {expected}, but the current version is {current}; re-read them (show-properties) and apply your change on top")]
    VersionConflict {
        owner: String,
        expected: i64,
        current: i64,
    },
    #[error("the {owner} properties would be {size} bytes, over the limit of {limit} bytes: keep bulky data out of properties (in the repository, or a file a step reads)")]
    TooLarge {
        owner: String,
        size: usize,
        limit: usize,
    },
    #[error("the stored document of {owner} version {version} is corrupt")]
    Corrupt {
        owner: String,
        version: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("store query failed")]
    Query(#[from] sqlx::Error),
}

/// Handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    id: String,
    home: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `runner.db` in `home` and brings its schema up to date.
    pub async fn open(home: &Path) -> Result<Store, StoreError> {
        let path = home.join("runner.db");
        crate::data_dir::prepare_database(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source: sqlx::Error::Io(source),
        })?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            // WAL lets readers proceed while a step's patches are written; the busy timeout makes concurrent
            // writers from other runner processes wait their turn instead of failing.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            // New stores give pages freed by log retention back to the file system without a full rewrite.
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(32)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        // Names this data directory on shared resources (container labels); stable across restarts.
        let canonical = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_owned());
        let id = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(canonical.to_string_lossy().as_bytes())[..8])
        };
        Ok(Store {
            pool,
            id,
            home: home.to_owned(),
        })
    }

    /// This data directory's id, as put on container labels.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts a write transaction that takes the write lock up front, so two processes never both read and then
    /// fail to upgrade (SQLite's deferred transactions would answer SQLITE_BUSY at once instead of waiting).
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
