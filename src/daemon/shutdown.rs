//! The signals that ask a long-running runner process to stop: SIGTERM (service managers, `docker stop`), SIGINT
//! (Ctrl-C) and SIGHUP (a closed terminal) are handled alike, so whichever arrives, the process cancels what it
//! runs, waits for its steps to stop and their containers to go, and only then gives up its lease.

use tokio::signal::unix::{signal, SignalKind};

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Interrupt,
    Hangup,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
        })
    }
}

/// Installs the handlers now (so a signal that arrives early is not lost) and returns a future that completes
/// when the first of them arrives. Fails only if the process cannot install signal handlers.
pub fn signals() -> std::io::Result<impl std::future::Future<Output = Signal> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = int.recv() => Signal::Interrupt,
            _ = hup.recv() => Signal::Hangup,
        }
    })
}
