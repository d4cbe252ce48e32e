//! A change's event log as stored: events one row each, log lines packed into chunks (see
//! [`crate::logs::chunk`]), both numbered in one sequence per change; and the retention that prunes lines of old
//! changes while keeping the changes, their steps and their other events.

use super::db::{query, Tx};

use super::{Store, StoreError};
use crate::events::{Event, EventRecord};
use crate::logs::chunk::{self, ChunkLine, EncodedChunk};

/// One entry of a batch the recorder stores in one transaction.
#[derive(Debug)]
pub enum BatchEntry {
    /// An event, with its time (RFC 3339).
    Event { event: Event, at: String },
    /// `lines` consecutive log lines, already packed.
    Lines {
        count: i64,
        first_at: i64,
        last_at: i64,
        text_bytes: i64,
        chunk: EncodedChunk,
    },
}

/// What pruning did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub changes: u64,
    pub chunks: u64,
    /// Bytes of log text removed.
    pub text_bytes: u64,
    /// Size of the store files (database and write-ahead log) before and after.
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
}

/// Rows one multi-row `INSERT` of a batch carries at most (few statement shapes for the statement caches).
const ROWS_PER_INSERT: usize = 16;

/// `prefix` followed by `rows` groups of `columns` placeholders: `(?, ?), (?, ?)`.
fn values(prefix: &str, columns: usize, rows: usize) -> String {
    let group = format!("({})", vec!["?"; columns].join(", "));
    format!("{prefix}{}", vec![group; rows].join(", "))
}

/// Unix milliseconds → RFC 3339 (UTC, milliseconds), the form every stored time takes.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Reserves the next `count` sequence numbers of a change and returns the first (with the change's attempt): an increment of the change's
/// own counter, which row-locks it until the transaction ends, so concurrent writers of one change queue and
/// writers of different changes do not meet.
pub(super) async fn reserve_seqs(
    tx: &mut Tx,
    change_id: &str,
    count: i64,
) -> Result<(i64, i64), StoreError> {
    let row = query(
        "UPDATE changes SET last_seq = last_seq + ? WHERE id = ? RETURNING last_seq, attempt",
    )
    .bind(count)
    .bind(change_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "change",
        code: change_id.to_owned(),
        hint: ": list changes with `runner change list`".into(),
    })?;
    let (last, attempt): (i64, i64) = (row.get(0), row.get(1));
    Ok((last - count + 1, attempt))
}

impl Store {
    /// Stores a batch of events and packed lines in one transaction; returns the sequence number of its first
    /// entry (the rest follow without gaps, a chunk of `count` lines taking `count` numbers).
    pub async fn append_batch(
        &self,
        change_id: &str,
        entries: &[BatchEntry],
    ) -> Result<i64, StoreError> {
        Ok(self.append_batch_in_attempt(change_id, entries).await?.0)
    }

    /// [`Store::append_batch`], also returning the change's attempt the batch was stored in.
    pub async fn append_batch_in_attempt(
        &self,
        change_id: &str,
        entries: &[BatchEntry],
    ) -> Result<(i64, i64), StoreError> {
        let count = entries
            .iter()
            .map(|e| match e {
                BatchEntry::Event { .. } => 1,
                BatchEntry::Lines { count, .. } => *count,
            })
            .sum();
        // Entries numbered from 1 within the batch, in order.
        let mut events = Vec::new();
        let mut chunks = Vec::new();
        let mut offset = 1;
        for entry in entries {
            match entry {
                BatchEntry::Event { event, at } => {
                    let text = serde_json::to_string(event).expect("events serialise");
                    events.push((offset, at, text));
                    offset += 1;
                }
                BatchEntry::Lines {
                    count,
                    first_at,
                    last_at,
                    text_bytes,
                    chunk,
                } => {
                    chunks.push((offset, *count, *first_at, *last_at, *text_bytes, chunk));
                    offset += count;
                }
            }
        }
        if self.backend() == super::Backend::Postgres
            && (1..=ROWS_PER_INSERT).contains(&(events.len() + chunks.len()))
        {
            return append_in_one_statement(self, change_id, count, &events, &chunks).await;
        }
        // Only this change's row is locked: log writers of different changes never wait for one another.
        let mut tx = self.pool.row_tx().await?;
        let (first, attempt) = reserve_seqs(&mut tx, change_id, count).await?;
        // Stored a few rows per statement: a flush costs a handful of round trips, not one per entry.
        let base = first - 1;
        for rows in events.chunks(ROWS_PER_INSERT) {
            let mut insert = query(values(
                "INSERT INTO events (change_id, seq, at, event) VALUES ",
                4,
                rows.len(),
            ));
            for (offset, at, event) in rows {
                insert = insert
                    .bind(change_id)
                    .bind(base + offset)
                    .bind(*at)
                    .bind(event);
            }
            insert.execute(&mut tx).await?;
        }
        for rows in chunks.chunks(ROWS_PER_INSERT) {
            let mut insert = query(values(
                "INSERT INTO log_chunks (change_id, first_seq, last_seq, first_at, last_at, text_bytes, \
                 encoding, raw_len, data) VALUES ",
                9,
                rows.len(),
            ));
            for (offset, count, first_at, last_at, text_bytes, chunk) in rows {
                insert = insert
                    .bind(change_id)
                    .bind(base + offset)
                    .bind(base + offset + count - 1)
                    .bind(*first_at)
                    .bind(*last_at)
                    .bind(*text_bytes)
                    .bind(chunk.encoding)
                    .bind(chunk.raw_len as i64)
                    .bind(&chunk.data);
            }
            insert.execute(&mut tx).await?;
        }
        tx.commit().await?;
        self.changed(change_id);
        Ok((first, attempt))
    }

    /// The change's events and log lines with `after < seq <= until` (no upper bound if `until` is `None`), in
    /// order.
    pub async fn events_between(
        &self,
        change_id: &str,
        after: i64,
        until: Option<i64>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let until = until.unwrap_or(i64::MAX);
        let rows = query(
            "SELECT seq, at, event FROM events WHERE change_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
        )
        .bind(change_id)
        .bind(after)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        let mut records: Vec<EventRecord> = rows
            .iter()
            .filter_map(|row| {
                Some(EventRecord {
                    change_id: change_id.to_owned(),
                    attempt: 1,
                    seq: row.get("seq"),
                    at: row.get("at"),
                    event: serde_json::from_str(row.get::<&str, _>("event")).ok()?,
                })
            })
            .collect();
        let chunks = query(
            "SELECT first_seq, encoding, raw_len, data FROM log_chunks \
             WHERE change_id = ? AND last_seq > ? AND first_seq <= ? ORDER BY first_seq",
        )
        .bind(change_id)
        .bind(after)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        let had_events = !records.is_empty();
        for row in &chunks {
            let first: i64 = row.get("first_seq");
            let lines = match chunk::decode(
                row.get("encoding"),
                row.get::<i64, _>("raw_len").max(0) as usize,
                row.get::<&[u8], _>("data"),
            ) {
                Ok(lines) => lines,
                Err(e) => {
                    tracing::warn!(error = %e, change_id, first_seq = first, "skipping a corrupt log chunk");
                    continue;
                }
            };
            records.extend(
                lines
                    .into_iter()
                    .zip(first..)
                    .filter(|(_, seq)| *seq > after && *seq <= until)
                    .map(|(line, seq)| line_record(change_id, seq, line)),
            );
        }
        if had_events && !chunks.is_empty() {
            records.sort_by_key(|r| r.seq);
        }
        let bounds = self.attempt_bounds(change_id).await?;
        if !bounds.is_empty() {
            for record in &mut records {
                record.attempt = super::attempts::attempt_of(&bounds, record.seq);
            }
        }
        Ok(records)
    }

    /// The highest sequence number the change has used (0 if none).
    pub async fn last_seq(&self, change_id: &str) -> Result<i64, StoreError> {
        Ok(query("SELECT last_seq FROM changes WHERE id = ?")
            .bind(change_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0))
    }

    /// Deletes the log lines of changes that ended before `before` (RFC 3339), keeping the changes, their steps and
    /// their other events, then gives the space back to the file system.
    pub async fn prune_logs(&self, before: &str) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned {
            store_bytes_before: self.file_bytes(),
            ..Default::default()
        };
        let mut tx = self.write_tx().await?;
        let old = "SELECT id FROM changes WHERE finished_at IS NOT NULL AND finished_at < ?";
        let row = query(format!(
            "SELECT COUNT(DISTINCT change_id), COUNT(*), CAST(COALESCE(SUM(text_bytes), 0) AS BIGINT) FROM log_chunks \
             WHERE change_id IN ({old})"
        ))
        .bind(before)
        .fetch_one(&mut tx)
        .await?;
        pruned.changes = row.get::<i64, _>(0) as u64;
        pruned.chunks = row.get::<i64, _>(1) as u64;
        pruned.text_bytes = row.get::<i64, _>(2) as u64;
        query(format!("DELETE FROM log_chunks WHERE change_id IN ({old})"))
            .bind(before)
            .execute(&mut tx)
            .await?;
        // Lines stored as single events before chunks existed.
        let old_lines = query(format!(
            "DELETE FROM events WHERE change_id IN ({old}) AND event LIKE '{{\"type\":\"log\"%'"
        ))
        .bind(before)
        .execute(&mut tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if pruned.chunks > 0 || old_lines > 0 {
            self.reclaim_space().await?;
        }
        pruned.store_bytes_after = self.file_bytes();
        Ok(pruned)
    }

    /// Returns free pages to the file system: incrementally when the store was created for it, otherwise by
    /// rewriting it once (which also switches it to incremental vacuuming). PostgreSQL's autovacuum does this
    /// itself.
    async fn reclaim_space(&self) -> Result<(), StoreError> {
        use sqlx::Row as _;
        let super::db::Pool::Sqlite(pool) = &self.pool else {
            return Ok(());
        };
        let mut conn = pool.acquire().await?;
        let mode: i64 = sqlx::query("PRAGMA auto_vacuum")
            .fetch_one(&mut *conn)
            .await?
            .get(0);
        if mode == 2 {
            sqlx::query("PRAGMA incremental_vacuum")
                .execute(&mut *conn)
                .await?;
        } else {
            sqlx::query("PRAGMA auto_vacuum = INCREMENTAL")
                .execute(&mut *conn)
                .await?;
            sqlx::query("VACUUM").execute(&mut *conn).await?;
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Bytes of the store's files on disk (database and write-ahead log); 0 on PostgreSQL, whose files are the
    /// server's.
    pub fn file_bytes(&self) -> u64 {
        if self.backend() != super::Backend::Sqlite {
            return 0;
        }
        ["runner.db", "runner.db-wal"]
            .iter()
            .filter_map(|name| std::fs::metadata(self.home.join(name)).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// An event of a batch: its number within the batch (from 1), time and JSON.
type EventRow<'a> = (i64, &'a String, String);
/// A chunk of a batch: its first number within the batch (from 1), lines, first and last time, text bytes, data.
type ChunkRow<'a> = (i64, i64, i64, i64, i64, &'a EncodedChunk);

/// [`Store::append_batch`] on PostgreSQL as one statement, which commits on its own: the change's counter moves
/// (locking its row, as [`reserve_seqs`] does) and the events and chunks are inserted numbered from it, in one
/// round trip instead of a transaction's five.
async fn append_in_one_statement(
    store: &Store,
    change_id: &str,
    count: i64,
    events: &[EventRow<'_>],
    chunks: &[ChunkRow<'_>],
) -> Result<(i64, i64), StoreError> {
    let mut sql = String::from(
        "WITH s AS (UPDATE changes SET last_seq = last_seq + ?2 WHERE id = ?1 \
         RETURNING last_seq - ?2 AS base, attempt)",
    );
    if !events.is_empty() {
        sql.push_str(&values(
            ", e AS (INSERT INTO events (change_id, seq, at, event) SELECT ?1, s.base + v.o, v.a, v.e \
             FROM s, (VALUES ",
            3,
            events.len(),
        ));
        sql.push_str(") AS v(o, a, e))");
    }
    if !chunks.is_empty() {
        sql.push_str(&values(
            ", c AS (INSERT INTO log_chunks (change_id, first_seq, last_seq, first_at, last_at, text_bytes, \
             encoding, raw_len, data) SELECT ?1, s.base + v.o, s.base + v.o + v.n - 1, v.fa, v.la, v.tb, v.enc, \
             v.rl, v.d FROM s, (VALUES ",
            8,
            chunks.len(),
        ));
        sql.push_str(") AS v(o, n, fa, la, tb, enc, rl, d))");
    }
    sql.push_str(" SELECT base + 1, attempt FROM s");
    let mut statement = query(sql).bind(change_id).bind(count);
    for (offset, at, event) in events {
        statement = statement.bind(*offset).bind(*at).bind(event);
    }
    for (offset, lines, first_at, last_at, text_bytes, chunk) in chunks {
        statement = statement
            .bind(*offset)
            .bind(*lines)
            .bind(*first_at)
            .bind(*last_at)
            .bind(*text_bytes)
            .bind(chunk.encoding)
            .bind(chunk.raw_len as i64)
            .bind(&chunk.data);
    }
    let row = statement
        .fetch_optional(&store.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "change",
            code: change_id.to_owned(),
            hint: ": list changes with `runner change list`".into(),
        })?;
    Ok((row.get(0), row.get(1)))
}

fn line_record(change_id: &str, seq: i64, line: ChunkLine) -> EventRecord {
    EventRecord {
        change_id: change_id.to_owned(),
        attempt: 1,
        seq,
        at: rfc3339_ms(line.at_ms),
        event: Event::Log {
            step_id: line.step_id,
            stream: line.stream,
            line: line.line,
        },
    }
}
