//! Leases of live runner processes, and the reaper that cleans up after dead ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

use super::Orchestrator;
use crate::error::Result;

/// How long a lease lives without renewal, and how often it is renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
pub const LEASE_RENEW: Duration = Duration::from_secs(10);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// This machine's name, to tell whether a lease's pid can be checked here.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this pid exists on this machine.
pub fn pid_alive(pid: i64) -> bool {
    if pid <= 0 || pid > i32::MAX as i64 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; it sends nothing.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub host: String,
    pub pid: i64,
    pub expires_at: i64,
}

/// Whether the runner holding `owner` is gone: no lease, an expired one, or a pid on this host that no longer
/// exists (so a `kill -9` is noticed at once rather than after the lease runs out).
pub fn owner_is_dead(owner: &str, leases: &[Lease], this_host: &str, now_ms: i64) -> bool {
    match leases.iter().find(|l| l.owner == owner) {
        None => true,
        Some(lease) if lease.expires_at < now_ms => true,
        Some(lease) => lease.host == this_host && !pid_alive(lease.pid),
    }
}

impl Orchestrator {
    /// Takes (or renews) the lease of this orchestrator's owner on behalf of process `pid` — the process that
    /// answers for its changes until that process renews the lease itself.
    pub async fn take_lease_for(&self, pid: u32) -> Result<()> {
        Ok(self
            .app
            .store
            .renew_lease_for(&self.owner, &hostname(), pid, LEASE_TTL)
            .await?)
    }

    /// Takes this process's lease and keeps renewing it until `stop` is cancelled; then drops it. Renewal is a
    /// compare-and-set on a live lease: a lease that expired meanwhile (this process stalled, or lost the store
    /// for longer than the lease lives) is not silently taken back — others may already have reaped what it
    /// held — so [`lease_lost`](Self::lease_lost) fires and the process stops its work.
    pub async fn hold_lease(&self, stop: CancellationToken) -> Result<tokio::task::JoinHandle<()>> {
        let store = self.app.store.clone();
        let (owner, host, pid) = (self.owner.clone(), hostname(), std::process::id());
        // Expiry by the store's clock: every host judges leases by that one clock.
        store.renew_lease_for(&owner, &host, pid, LEASE_TTL).await?;
        let lost = self.lease_lost.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(LEASE_RENEW) => {
                        match store.renew_live_lease(&owner, LEASE_TTL).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::error!(owner = %owner, "this process's lease expired before it was renewed: others may have taken over its work; it stops and writes nothing more");
                                lost.cancel();
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "failed to renew the runner lease"),
                        }
                    }
                }
            }
            let _ = store.drop_lease(&owner).await;
        }))
    }

    /// Cancelled once this process's lease was found expired (see [`hold_lease`](Self::hold_lease)).
    pub fn lease_lost(&self) -> CancellationToken {
        self.lease_lost.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_owner_rules() {
        let host = hostname();
        let now = now_ms();
        let live = Lease {
            owner: "live".into(),
            host: host.clone(),
            pid: std::process::id() as i64,
            expires_at: now + 10_000,
        };
        let expired = Lease {
            owner: "expired".into(),
            expires_at: now - 1,
            ..live.clone()
        };
        let gone = Lease {
            owner: "gone".into(),
            pid: i32::MAX as i64 - 7,
            ..live.clone()
        };
        let elsewhere = Lease {
            owner: "elsewhere".into(),
            host: "another-host".into(),
            pid: i32::MAX as i64 - 7,
            ..live.clone()
        };
        let leases = [live, expired, gone, elsewhere];
        assert!(!owner_is_dead("live", &leases, &host, now));
        assert!(owner_is_dead("expired", &leases, &host, now));
        assert!(owner_is_dead("gone", &leases, &host, now));
        assert!(!owner_is_dead("elsewhere", &leases, &host, now));
        assert!(owner_is_dead("unknown", &leases, &host, now));
    }
}
