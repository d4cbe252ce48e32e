//! The persistent store: projects, environments, versioned properties (and, later, changes and steps).
//!
//! All SQL lives below this module; callers see typed records. Two backends (see [`db`]): SQLite, embedded, the
//! default (`runner.db` in the data directory), and PostgreSQL (`--database postgres://…`), which several runner
//! processes on several hosts share. Each has its own migrations (`migrations/` for SQLite, `migrations/postgres/`
//! for PostgreSQL, the same tables and numbers); every query is written once in the SQL both speak.

pub mod advance;
mod attempts;
mod base_images;
mod change_query;
mod changes;
mod claims;
mod db;
mod fleet;
mod labels;
mod logs;
mod project_admin;
mod projects;
mod properties;
mod requests;
mod step_runs;
mod transitions;
mod wakeups;
mod web;

pub use base_images::{BaseImageSetting, BaseImageSource};
pub use change_query::{ChangeQuery, Keyset};
pub use changes::{Change, ChangeFilter, NewChange, NewStep, Step, StepFinish};
pub use claims::{ClaimScope, ClaimedStep, Landed, StepEnd, StepSettle};
pub use db::{traffic, Backend, Traffic};
pub use fleet::StartedChange;
pub use labels::Labels;
pub use logs::{rfc3339_ms, BatchEntry, Pruned};
pub use projects::{Environment, Project};
pub use properties::{PropertiesOwner, PropertiesVersion, PropertiesWrite, WrittenBy};
pub use requests::{RequestClaim, ABANDONED_AFTER, REQUEST_ID_WINDOW};
pub use step_runs::{NewStepRun, StepRunEnd, StepRunEvent, StepRunOutcome, StepRunRecord};
pub use transitions::{Claim, ReapedChange, Transition, Verdict};
pub use wakeups::{
    parse_fallback, set_default_fallback, Signal, Woke, POSTGRES_FALLBACK, SQLITE_FALLBACK,
};
pub use web::{WebChangeFilter, WrittenVersion};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A pooled PostgreSQL connection idle this long is checked before it is used again.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(5);

/// Store failures. `NotFound`, `AlreadyExists` and `VersionConflict` are the caller's to act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to connect to the PostgreSQL store {url}: check that the server runs and the URL (host, port, user, database, password) is right")]
    Connect {
        /// The URL without its password.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the store URL {url:?} is not one the runner knows: use postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or postgresql://…), or leave it unset for the SQLite store in the data directory")]
    BadUrl { url: String },
    #[error("failed to migrate the store schema")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("{what} {code:?} does not exist{hint}")]
    NotFound {
        what: &'static str,
        code: String,
        hint: String,
    },
    #[error("{what} {code:?} is still used by {by}")]
    InUse {
        what: &'static str,
        code: String,
        by: String,
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
    pool: db::Pool,
    id: String,
    home: PathBuf,
    /// Wake-ups of followers and workers (see [`wakeups`]); shared by this handle's clones.
    wakeups: std::sync::Arc<wakeups::Hub>,
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
        Ok(Store::with_pool(db::Pool::Sqlite(pool), home))
    }

    /// Opens the store `database` names (a `postgres://` URL), or the SQLite store in `home` when it is `None`.
    /// `home` stays this process's own data directory (secrets, mirrors, caches) either way.
    pub async fn connect(home: &Path, database: Option<&str>) -> Result<Store, StoreError> {
        let Some(url) = database.filter(|u| !u.is_empty()) else {
            return Store::open(home).await;
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::BadUrl {
                url: redact_url(url),
            });
        }
        let options: PgConnectOptions = url.parse().map_err(|_| StoreError::BadUrl {
            url: redact_url(url),
        })?;
        // One connection first: a server that is down or refuses the login answers at once, where the pool
        // would retry until its acquire timeout.
        {
            use sqlx::Connection;
            let probe = sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(|source| StoreError::Connect {
                    url: redact_url(url),
                    source,
                })?;
            let _ = probe.close().await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // A worker's next statement finds a connection open (and its prepared statements) rather than
            // opening one.
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            // A connection in steady use is known to be alive: it is checked (one more round trip) only when it
            // sat idle long enough for the server to have gone away (a restart, a proxy's idle timeout); one that
            // fails the check is dropped and another taken.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    use sqlx::Connection;
                    Ok(meta.idle_for < CHECK_IDLE_AFTER || conn.ping().await.is_ok())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect {
                url: redact_url(url),
                source,
            })?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Store::with_pool(db::Pool::Postgres(pool), home))
    }

    fn with_pool(pool: db::Pool, home: &Path) -> Store {
        // Names this data directory on shared resources (container labels); stable across restarts.
        let canonical = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_owned());
        let id = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(canonical.to_string_lossy().as_bytes())[..8])
        };
        Store {
            pool,
            id,
            home: home.to_owned(),
            wakeups: std::sync::Arc::new(wakeups::Hub::new()),
        }
    }

    /// Which engine this store runs on.
    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    /// Closes the store's connections (a PostgreSQL server then sees this process leave at once).
    pub async fn close(&self) {
        self.wakeups.close().await;
        self.pool.close().await
    }

    /// This data directory's id, as put on container labels.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts a write transaction that takes the writer's lock up front, so two processes never both read and
    /// then write on what they read (see [`db::Pool::write_tx`]).
    async fn write_tx(&self) -> Result<db::Tx, StoreError> {
        Ok(self.pool.write_tx().await?)
    }
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// A store URL fit for messages: the password, if any (user info or `password=` parameter), replaced.
pub fn redact_url(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, params)) => {
            let params: Vec<String> = params
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
        None => url.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://runner:s3cret@db:5432/runner?sslmode=require&password=other"),
            "postgres://runner:***@db:5432/runner?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://runner@db/runner"),
            "postgres://runner@db/runner"
        );
        assert_eq!(redact_url("mysql:nothing"), "mysql:nothing");
    }
}
