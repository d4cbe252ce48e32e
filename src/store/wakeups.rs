//! Wake-ups: how a follower of a change (WatchChange, the web's live pages, `show-logs --follow`) or a worker
//! waiting for work learns that the store moved on, whichever process or host wrote it.
//!
//! - PostgreSQL: the database announces its own writes. Triggers (migration 0060) `NOTIFY` on `runner_change`
//!   (payload: the change id) when an event or log chunk of a change is inserted (not when its row moves: a
//!   follower woken by a final state before the events that go with it are stored would stop short),
//!   `runner_step_run` (the run id) for step runs, and `runner_work` when there may be something for a worker
//!   to do (a change created, released, claimed, ended or asked to cancel; a step made ready). One `LISTEN`ing
//!   connection per store handle, started on first use, fans the notifications out in this process; it
//!   reconnects on its own and, after any gap, wakes every waiter so each reads the store again.
//! - SQLite: one process owns the writes that matter to it; the store's writers in this process signal after
//!   they commit, and other processes' writes are seen by polling.
//!
//! Either way a [`Signal`] also resolves after its fallback interval, so a lost notification (or a listener that
//! cannot connect) slows a follower down but never wedges it. The fallback is the backend's default
//! ([`SQLITE_FALLBACK`], [`POSTGRES_FALLBACK`]), or what the operator set (`RUNNER_FOLLOW_FALLBACK`, see
//! [`set_default_fallback`]). A follower takes its signal *before* it first reads the store: what is written
//! after that read is then never missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::db::Pool;
use super::Store;

/// The channel of a change's news; payload: the change id.
pub const CHANGE_CHANNEL: &str = "runner_change";
/// The channel of a step run's news; payload: the run id.
pub const STEP_RUN_CHANNEL: &str = "runner_step_run";
/// The channel that says a worker may have something to do; empty payload.
pub const WORK_CHANNEL: &str = "runner_work";

/// How often a follower looks at an SQLite store written by another process.
pub const SQLITE_FALLBACK: Duration = Duration::from_millis(200);
/// How often a follower looks at a PostgreSQL store when no notification came: a safety net only.
pub const POSTGRES_FALLBACK: Duration = Duration::from_secs(2);
/// The shortest fallback accepted: shorter ones turn every follower into a busy loop on the store.
pub const MIN_FALLBACK: Duration = Duration::from_millis(10);

/// Notifications buffered per waiter; a waiter that falls further behind just wakes (and reads the store).
const CAPACITY: usize = 1024;
/// The longest wait between two attempts to (re)connect the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The process-wide fallback set by the operator, in milliseconds (0: the backend's default).
static DEFAULT_FALLBACK_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the fallback of every store this process opens from now on (and of those open now that were not given
/// their own with [`Store::set_follow_fallback`]).
pub fn set_default_fallback(fallback: Duration) {
    DEFAULT_FALLBACK_MS.store(fallback.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// Parses a fallback interval as the operator writes it (`500ms`, `2s`, `1m`); too short or malformed values
/// are refused with what to write instead.
pub fn parse_fallback(text: &str) -> Result<Duration, String> {
    let fallback = crate::actions::parse_duration(text)?;
    if fallback < MIN_FALLBACK {
        return Err(format!(
            "the fallback poll {text:?} is too short: at least {}ms (e.g. 500ms, 2s, 1m)",
            MIN_FALLBACK.as_millis()
        ));
    }
    Ok(fallback)
}

/// What a [`Signal`] waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Change(String),
    /// Any of these changes (a page of them).
    Changes(Vec<String>),
    StepRun(String),
    Work,
}

/// What went past on the hub.
#[derive(Debug, Clone)]
enum Topic {
    Change(Arc<str>),
    StepRun(Arc<str>),
    Work,
    /// Anything may have happened (the listener reconnected, or could not keep up): everyone looks again.
    All,
}

impl Topic {
    fn wakes(&self, key: &Key) -> bool {
        match (self, key) {
            (Topic::All, _) | (Topic::Work, Key::Work) => true,
            (Topic::Change(id), Key::Change(k)) | (Topic::StepRun(id), Key::StepRun(k)) => {
                **id == **k
            }
            (Topic::Change(id), Key::Changes(ks)) => ks.iter().any(|k| **id == **k),
            _ => false,
        }
    }
}

/// Why a [`Signal::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// A notification (or the in-process signal of a writer) said something may have changed.
    Notified,
    /// The fallback interval passed without one.
    Fallback,
}

/// A follower's view of the hub: resolves when what it follows may have changed, or after the fallback.
pub struct Signal {
    rx: broadcast::Receiver<Topic>,
    key: Key,
    fallback: Duration,
    // Keeps the hub (and its listener) alive while someone waits.
    _hub: Arc<Hub>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("key", &self.key)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl Signal {
    /// Waits for a notification about what this signal follows, or its fallback interval.
    pub async fn wait(&mut self) -> Woke {
        self.wait_at_most(self.fallback).await
    }

    /// [`wait`](Self::wait), with `max` as the fallback interval.
    pub async fn wait_at_most(&mut self, max: Duration) -> Woke {
        let woke = tokio::time::timeout(max, async {
            loop {
                match self.rx.recv().await {
                    Ok(topic) if topic.wakes(&self.key) => return Woke::Notified,
                    Ok(_) => {}
                    // Missed some: one of them may have been ours.
                    Err(broadcast::error::RecvError::Lagged(_)) => return Woke::Notified,
                    // The hub is gone (its store closed): only the clock is left.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await
        .unwrap_or(Woke::Fallback);
        if woke == Woke::Notified {
            // A burst (a step's log lines) wakes a follower once: what else is queued for it is read with it.
            while let Ok(topic) = self.rx.try_recv() {
                let _ = topic;
            }
        }
        woke
    }

    /// The fallback interval of [`wait`](Self::wait).
    pub fn fallback(&self) -> Duration {
        self.fallback
    }
}

/// One store handle's wake-ups: the fan-out channel and, on PostgreSQL, the listener feeding it.
pub(crate) struct Hub {
    tx: broadcast::Sender<Topic>,
    /// This store's own fallback in milliseconds (0: the process default, else the backend's).
    fallback_ms: AtomicU64,
    listener: tokio::sync::OnceCell<Listener>,
    stop: CancellationToken,
}

struct Listener {
    pool: PgPool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("listening", &self.listener.initialized())
            .finish()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            tx: broadcast::channel(CAPACITY).0,
            fallback_ms: AtomicU64::new(0),
            listener: tokio::sync::OnceCell::new(),
            stop: CancellationToken::new(),
        }
    }

    fn send(&self, topic: Topic) {
        // No receiver: nobody waits, nothing to do.
        let _ = self.tx.send(topic);
    }

    /// Stops the listener (its connection closes) and waits for it to be gone.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        if let Some(listener) = self.listener.get() {
            let task = listener.task.lock().expect("listener lock").take();
            if let Some(task) = task {
                let _ = task.await;
            }
            listener.pool.close().await;
        }
    }
}

impl Store {
    /// A signal that resolves when the change `change_id` may have moved on: an event or log line of it stored
    /// (every state it takes is one).
    pub async fn change_signal(&self, change_id: &str) -> Signal {
        self.signal(Key::Change(change_id.to_owned())).await
    }

    /// [`change_signal`](Self::change_signal) for any of several changes (a page of them).
    pub async fn changes_signal(&self, change_ids: &[String]) -> Signal {
        self.signal(Key::Changes(change_ids.to_vec())).await
    }

    /// A signal that resolves when the step run `run_id` may have moved on.
    pub async fn step_run_signal(&self, run_id: &str) -> Signal {
        self.signal(Key::StepRun(run_id.to_owned())).await
    }

    /// A signal for workers: resolves when there may be work (a change created, released or ended, a step made
    /// ready, a cancel asked for).
    pub async fn work_signal(&self) -> Signal {
        self.signal(Key::Work).await
    }

    /// The fallback interval of this store's signals.
    pub fn follow_fallback(&self) -> Duration {
        let own = self.wakeups.fallback_ms.load(Ordering::Relaxed);
        let process = DEFAULT_FALLBACK_MS.load(Ordering::Relaxed);
        match (own, process) {
            (0, 0) => match self.pool {
                Pool::Sqlite(_) => SQLITE_FALLBACK,
                Pool::Postgres(_) => POSTGRES_FALLBACK,
            },
            (0, ms) | (ms, _) => Duration::from_millis(ms),
        }
    }

    /// Sets the fallback interval of this store's signals (every clone of this handle shares it).
    pub fn set_follow_fallback(&self, fallback: Duration) {
        self.wakeups
            .fallback_ms
            .store(fallback.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    async fn signal(&self, key: Key) -> Signal {
        // Subscribed before the listener is known to listen and before the caller reads the store: nothing
        // announced after this returns is missed.
        let rx = self.wakeups.tx.subscribe();
        if let Pool::Postgres(pool) = &self.pool {
            self.wakeups
                .listener
                .get_or_init(|| listen(pool, &self.wakeups))
                .await;
        }
        Signal {
            rx,
            key,
            fallback: self.follow_fallback(),
            _hub: self.wakeups.clone(),
        }
    }

    /// In-process signal of a writer that changed `change_id` (SQLite; on PostgreSQL the database notifies).
    pub(crate) fn changed(&self, change_id: &str) {
        if let Pool::Sqlite(_) = self.pool {
            self.wakeups.send(Topic::Change(change_id.into()));
        }
    }

    /// In-process signal of a writer that changed the step run `run_id` (SQLite only, as [`Store::changed`]).
    pub(crate) fn step_run_changed(&self, run_id: &str) {
        if let Pool::Sqlite(_) = self.pool {
            self.wakeups.send(Topic::StepRun(run_id.into()));
        }
    }

    /// In-process signal of a writer that may have made work for a worker (SQLite only, as [`Store::changed`]).
    pub(crate) fn work_changed(&self) {
        if let Pool::Sqlite(_) = self.pool {
            self.wakeups.send(Topic::Work);
        }
    }
}

/// Starts the listener of `hub` on a connection of its own (not one of the store's pool, so the pool's size and
/// its closing are not the listener's business). Returns once it listens, or once its first attempt failed, in
/// which case it keeps trying in the background and followers poll meanwhile.
async fn listen(pool: &PgPool, hub: &Arc<Hub>) -> Listener {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_listener(
        own.clone(),
        hub.tx.clone(),
        hub.stop.clone(),
        ready_tx,
    ));
    let _ = ready_rx.await;
    Listener {
        pool: own,
        task: Mutex::new(Some(task)),
    }
}

async fn run_listener(
    pool: PgPool,
    tx: broadcast::Sender<Topic>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all([CHANGE_CHANNEL, STEP_RUN_CHANNEL, WORK_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = tokio::select! {
            _ = stop.cancelled() => return,
            connected = connected => connected,
        };
        // The first signal waits for this first attempt: its caller reads the store only after it listens.
        let first = match ready.take() {
            Some(ready) => ready.send(()).is_ok() && listener.is_ok(),
            None => false,
        };
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot listen for the store's notifications; followers poll meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !first {
            // Whatever was announced while nobody listened: everyone reads the store again.
            let _ = tx.send(Topic::All);
        }
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => {
                    let payload = notification.payload();
                    let topic = match notification.channel() {
                        CHANGE_CHANNEL => Topic::Change(payload.into()),
                        STEP_RUN_CHANNEL => Topic::StepRun(payload.into()),
                        WORK_CHANNEL => Topic::Work,
                        _ => Topic::All,
                    };
                    let _ = tx.send(topic);
                }
                // The connection was lost and is back (listening again): what fell in the gap is unknown.
                Ok(None) => {
                    let _ = tx.send(Topic::All);
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(error) => {
                    tracing::warn!(%error, "the store's notification listener lost its connection; reconnecting");
                    let _ = tx.send(Topic::All);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_wake_only_their_followers() {
        let change = Key::Change("c1".into());
        assert!(Topic::Change("c1".into()).wakes(&change));
        assert!(!Topic::Change("c2".into()).wakes(&change));
        assert!(!Topic::StepRun("c1".into()).wakes(&change));
        assert!(!Topic::Work.wakes(&change));
        assert!(Topic::All.wakes(&change));
        assert!(Topic::Work.wakes(&Key::Work));
        assert!(!Topic::Change("c1".into()).wakes(&Key::Work));
        assert!(Topic::StepRun("r".into()).wakes(&Key::StepRun("r".into())));
        let page = Key::Changes(vec!["c1".into(), "c2".into()]);
        assert!(Topic::Change("c2".into()).wakes(&page));
        assert!(!Topic::Change("c3".into()).wakes(&page));
        assert!(!Topic::Work.wakes(&page));
    }

    #[test]
    fn fallbacks_parse_and_refuse_busy_loops() {
        assert_eq!(parse_fallback("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_fallback("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_fallback("0s").unwrap_err().contains("too short"));
        assert!(parse_fallback("1ms").unwrap_err().contains("at least 10ms"));
        assert!(parse_fallback("soon")
            .unwrap_err()
            .contains("invalid duration"));
        assert!(parse_fallback("5 fortnights")
            .unwrap_err()
            .contains("invalid duration unit"));
    }
}
