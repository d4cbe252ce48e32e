//! The two database backends behind one query surface: SQLite (embedded, the default) and PostgreSQL (shared by a
//! fleet). A query is written once, with `?`, `?N` or `$N` placeholders, and runs on either: on PostgreSQL the
//! placeholders are numbered `$N`. Values are bound with the few types the schema uses (integers, text, bytes;
//! booleans are stored as 0/1 integers on both), and rows are read with the same types, so a query and the code
//! that reads its rows are one text instantiated for both drivers (sqlx's `Any` driver is not used: it loses
//! PostgreSQL's locking and notification features the fleet needs).
//!
//! Differences the SQL cannot hide live here and nowhere else: how a write transaction takes the writer's lock,
//! and how it locks one row.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Postgres, Sqlite, Transaction};

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool of connections to one of the backends; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An open transaction on either backend.
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// The key of the transaction-scoped advisory lock a PostgreSQL [`Pool::write_tx`] takes: its writers queue one
/// behind the other exactly as SQLite's `BEGIN IMMEDIATE` makes them, so a read-then-write spanning unrelated rows
/// sees no concurrent writer. The writes of a step's path do not take it ([`Pool::row_tx`]: a claim, a recorder
/// flush, a settle with its patches, an environment claim, a property write lock only the rows they depend on).
/// It stays where the check spans rows no one row stands for: a change's creation (creation order is the order
/// changes claim their environment, so it must be the order their rows become visible), a retry's new attempt, the
/// reapers' sweeps (verdicts on every lease), project and environment administration (codes, "still in use"),
/// step runs and log retention — none of them per step.
const PG_WRITER_LOCK: i64 = 0x7275_6e6e_6572; // "runner"

/// Statements and transactions this process has sent to its stores (all of them, either backend): what a bench
/// divides by the steps it ran to say how many round trips and commits a step costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Statements executed (each one round trip; `BEGIN` and `COMMIT` not included).
    pub statements: u64,
    /// Transactions committed (each `BEGIN` + `COMMIT`, two more round trips, and one durable flush).
    pub commits: u64,
    /// Writes run outside a transaction (each its own commit and durable flush, in one round trip).
    pub autocommits: u64,
}

static STATEMENTS: AtomicU64 = AtomicU64::new(0);
static COMMITS: AtomicU64 = AtomicU64::new(0);
static AUTOCOMMITS: AtomicU64 = AtomicU64::new(0);

/// Counts a statement sent to a pool (outside a transaction) that writes: it commits on its own.
fn count_autocommit(sql: &str) {
    let sql = sql.trim_start();
    let starts = |verb: &str| {
        sql.get(..verb.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(verb))
    };
    let writes = ["INSERT", "UPDATE", "DELETE"].iter().any(|v| starts(v))
        || (starts("WITH")
            && ["(UPDATE ", "(INSERT ", "(DELETE "]
                .iter()
                .any(|w| sql.contains(w)));
    if writes {
        AUTOCOMMITS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The traffic so far (see [`Traffic`]).
pub fn traffic() -> Traffic {
    Traffic {
        statements: STATEMENTS.load(Ordering::Relaxed),
        commits: COMMITS.load(Ordering::Relaxed),
        autocommits: AUTOCOMMITS.load(Ordering::Relaxed),
    }
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            statements: self.statements.saturating_sub(earlier.statements),
            commits: self.commits.saturating_sub(earlier.commits),
            autocommits: self.autocommits.saturating_sub(earlier.autocommits),
        }
    }
}

impl Backend {
    /// The database's clock, in Unix milliseconds, as an SQL expression: leases are judged by one clock, the
    /// store's, whatever the clocks of the hosts that hold them say.
    pub(crate) fn now_ms_sql(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

impl Pool {
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Starts a write transaction holding the store's writer lock from its first statement.
    pub(crate) async fn write_tx(&self) -> Result<Tx, sqlx::Error> {
        match self {
            // SQLite's deferred transactions would answer SQLITE_BUSY at once on the upgrade instead of waiting.
            Pool::Sqlite(pool) => Ok(Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?)),
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                STATEMENTS.fetch_add(1, Ordering::Relaxed);
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITER_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(Tx::Postgres(tx))
            }
        }
    }

    /// Starts a write transaction that relies on the row locks its statements take (PostgreSQL) rather than the
    /// store-wide writer lock; SQLite has only the one lock.
    pub(crate) async fn row_tx(&self) -> Result<Tx, sqlx::Error> {
        match self {
            Pool::Sqlite(pool) => Ok(Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?)),
            Pool::Postgres(pool) => Ok(Tx::Postgres(pool.begin().await?)),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}

impl Tx {
    /// Locks the row of `table` whose `id` is `id` until this transaction ends, so that writers which read
    /// something the row owns (its properties' latest version) and write on what they read queue one behind the
    /// other. PostgreSQL: `FOR NO KEY UPDATE` (it does not block rows that merely reference this one, such as a
    /// new change of an environment); SQLite: nothing, a write transaction already holds its only lock. False if
    /// there is no such row (PostgreSQL only; SQLite answers true).
    pub(crate) async fn lock_row(
        &mut self,
        table: LockedTable,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        match self {
            Tx::Sqlite(_) => Ok(true),
            Tx::Postgres(tx) => {
                STATEMENTS.fetch_add(1, Ordering::Relaxed);
                let sql = match table {
                    LockedTable::Projects => {
                        "SELECT 1 FROM projects WHERE id = $1 FOR NO KEY UPDATE"
                    }
                    LockedTable::Environments => {
                        "SELECT 1 FROM environments WHERE id = $1 FOR NO KEY UPDATE"
                    }
                };
                Ok(sqlx::query(sql)
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .is_some())
            }
        }
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        COMMITS.fetch_add(1, Ordering::Relaxed);
        match self {
            Tx::Sqlite(tx) => tx.commit().await,
            Tx::Postgres(tx) => tx.commit().await,
        }
    }
}

/// The tables whose rows [`Tx::lock_row`] locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LockedTable {
    Projects,
    Environments,
}

/// A bound value.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

macro_rules! arg_from {
    ($($t:ty => |$v:ident| $e:expr;)*) => {
        $(impl From<$t> for Arg {
            fn from($v: $t) -> Arg {
                $e
            }
        })*
    };
}

arg_from! {
    i64 => |v| Arg::Int(Some(v));
    Option<i64> => |v| Arg::Int(v);
    &i64 => |v| Arg::Int(Some(*v));
    &Option<i64> => |v| Arg::Int(*v);
    bool => |v| Arg::Int(Some(v as i64));
    &str => |v| Arg::Text(Some(v.to_owned()));
    String => |v| Arg::Text(Some(v));
    &String => |v| Arg::Text(Some(v.clone()));
    Option<&str> => |v| Arg::Text(v.map(str::to_owned));
    Option<String> => |v| Arg::Text(v);
    &Option<String> => |v| Arg::Text(v.clone());
    Option<&String> => |v| Arg::Text(v.cloned());
    &[u8] => |v| Arg::Bytes(Some(v.to_vec()));
    &Vec<u8> => |v| Arg::Bytes(Some(v.clone()));
    Vec<u8> => |v| Arg::Bytes(Some(v));
}

/// A statement and its bound values, run on whichever backend the executor is.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    sql: Cow<'static, str>,
    args: Vec<Arg>,
}

/// Starts a query (`?`, `?N` or `$N` placeholders).
pub(crate) fn query(sql: impl Into<Cow<'static, str>>) -> Query {
    Query {
        sql: sql.into(),
        args: Vec::new(),
    }
}

/// What a statement did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done(u64);

impl Done {
    pub(crate) fn rows_affected(&self) -> u64 {
        self.0
    }
}

/// Where a query runs: a pool, or an open transaction.
pub(crate) enum Target<'e> {
    SqlitePool(&'e SqlitePool),
    PgPool(&'e PgPool),
    SqliteConn(&'e mut SqliteConnection),
    PgConn(&'e mut PgConnection),
}

pub(crate) trait Executor<'e> {
    fn target(self) -> Target<'e>;
}

impl<'e> Executor<'e> for &'e Pool {
    fn target(self) -> Target<'e> {
        match self {
            Pool::Sqlite(p) => Target::SqlitePool(p),
            Pool::Postgres(p) => Target::PgPool(p),
        }
    }
}

impl<'e> Executor<'e> for &'e mut Tx {
    fn target(self) -> Target<'e> {
        match self {
            Tx::Sqlite(tx) => Target::SqliteConn(&mut *tx),
            Tx::Postgres(tx) => Target::PgConn(&mut *tx),
        }
    }
}

macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for arg in $args {
            q = match arg {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Runs `$method` of the query on whichever target it is given.
macro_rules! run_on {
    ($self:ident, $target:expr, $method:ident, |$r:ident| $map:expr) => {{
        let Query { sql, args } = $self;
        STATEMENTS.fetch_add(1, Ordering::Relaxed);
        match $target.target() {
            Target::SqlitePool(p) => {
                count_autocommit(&sql);
                let $r = bind_all!(sqlx::query::<Sqlite>(&sql), args)
                    .$method(p)
                    .await?;
                $map
            }
            Target::SqliteConn(c) => {
                let $r = bind_all!(sqlx::query::<Sqlite>(&sql), args)
                    .$method(c)
                    .await?;
                $map
            }
            Target::PgPool(p) => {
                count_autocommit(&sql);
                let sql = numbered(&sql);
                let $r = bind_all!(sqlx::query::<Postgres>(&sql), args)
                    .$method(p)
                    .await?;
                $map
            }
            Target::PgConn(c) => {
                let sql = numbered(&sql);
                let $r = bind_all!(sqlx::query::<Postgres>(&sql), args)
                    .$method(c)
                    .await?;
                $map
            }
        }
    }};
}

impl Query {
    pub(crate) fn bind(mut self, value: impl Into<Arg>) -> Query {
        self.args.push(value.into());
        self
    }

    pub(crate) async fn execute<'e>(self, on: impl Executor<'e>) -> Result<Done, sqlx::Error> {
        Ok(run_on!(self, on, execute, |r| Done(r.rows_affected())))
    }

    pub(crate) async fn fetch_all<'e>(
        self,
        on: impl Executor<'e>,
    ) -> Result<Vec<Row>, sqlx::Error> {
        Ok(run_on!(self, on, fetch_all, |r| r
            .into_iter()
            .map(Row::from)
            .collect()))
    }

    pub(crate) async fn fetch_optional<'e>(
        self,
        on: impl Executor<'e>,
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(run_on!(self, on, fetch_optional, |r| r.map(Row::from)))
    }

    pub(crate) async fn fetch_one<'e>(self, on: impl Executor<'e>) -> Result<Row, sqlx::Error> {
        Ok(run_on!(self, on, fetch_one, |r| Row::from(r)))
    }
}

/// `?` → `$1, $2, …` in order, `?N` → `$N`; `$N` and anything inside quotes stay as they are.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 0;
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                // As SQLite numbers them: a bare `?` is one more than the largest number so far.
                match digits.parse::<usize>() {
                    Ok(n) => next = next.max(n),
                    Err(_) => {
                        next += 1;
                        digits = next.to_string();
                    }
                }
                out.push('$');
                out.push_str(&digits);
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// A row of either backend.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl From<SqliteRow> for Row {
    fn from(r: SqliteRow) -> Row {
        Row::Sqlite(r)
    }
}

impl From<PgRow> for Row {
    fn from(r: PgRow) -> Row {
        Row::Postgres(r)
    }
}

/// A column type both backends decode.
pub(crate) trait Column<'r>:
    sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> + sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>
{
}

impl<'r, T> Column<'r> for T where
    T: sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
{
}

/// A column by name or position.
pub(crate) trait Index:
    sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow> + std::fmt::Debug
{
}

impl<I> Index for I where
    I: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow> + std::fmt::Debug
{
}

impl Row {
    /// The column's value; panics (as sqlx's `Row::get` does) when the schema and the code disagree.
    pub(crate) fn get<'r, T: Column<'r>, I: Index>(&'r self, index: I) -> T {
        use sqlx::Row as _;
        match self {
            Row::Sqlite(r) => r.get(index),
            Row::Postgres(r) => r.get(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            numbered("SELECT ? , '?', \"a?\" FROM t WHERE a = ?2 AND b = ? AND c = $7"),
            "SELECT $1 , '?', \"a?\" FROM t WHERE a = $2 AND b = $3 AND c = $7"
        );
    }
}
