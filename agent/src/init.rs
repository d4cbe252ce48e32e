//! The agent as the action's init: the action runs in a process group of its own, SIGTERM/SIGINT/SIGHUP sent to
//! the agent are forwarded to that whole group, every child that comes back to the agent is reaped (it is a child
//! subreaper, so the action's orphans come back to it) and the way the action ended — its exit code or the signal
//! that killed it — is reported.
//!
//! The signals are blocked once the agent has its envelope and only ever taken with `sigtimedwait`: one sent before
//! the action started is forwarded as soon as it starts, and none can kill the agent before it has written
//! `step_result.json`.

use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// The signals forwarded to the action's process group.
pub const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How the action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signalled(i32),
}

impl Ended {
    /// The agent's own exit code: the action's, or 128 + the signal, as a shell reports it.
    pub fn exit_code(&self) -> i32 {
        match self {
            Ended::Exited(code) => *code,
            Ended::Signalled(signal) => 128 + signal,
        }
    }
}

/// What happened to the action while the agent watched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervised {
    pub ended: Ended,
    /// The signals the agent received and forwarded to the action's group, in order.
    pub forwarded: Vec<i32>,
    /// The container's process limit (`pids.max`), when the action hit it and was stopped for that.
    pub pids_limit: Option<String>,
}

impl Supervised {
    /// The `exit` section of `step_result.json`.
    pub fn to_json(&self) -> Value {
        let (code, signal) = match self.ended {
            Ended::Exited(code) => (Some(code), None),
            Ended::Signalled(signal) => (None, Some(signal_name(signal))),
        };
        let mut exit = json!({
            "code": code,
            "signal": signal,
            "forwarded_signals": self.forwarded.iter().map(|s| signal_name(*s)).collect::<Vec<_>>(),
        });
        if let Some(max) = &self.pids_limit {
            exit["limit"] = json!({ "pids": max });
        }
        exit
    }
}

/// `SIGTERM`, `SIGKILL`, …; `SIG<n>` for the rest.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        libc::SIGALRM => "SIGALRM".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        other => format!("SIG{other}"),
    }
}

fn watched() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *signal);
        }
        set
    }
}

/// Blocks the forwarded signals and SIGCHLD (they stay pending until [`supervise`] takes them) and makes the agent
/// the reaper of its descendants' orphans. Call first, before anything that may take time.
pub fn take_over() {
    let set = watched();
    // SAFETY: plain syscalls on values we own; a failure leaves the default behaviour, which is still correct.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Starts `command` in a new process group with an empty signal mask and supervises it until
/// it ends: forwards signals to the group, reaps every child that ends meanwhile.
pub fn supervise(command: &mut Command) -> Result<Supervised, String> {
    use std::os::unix::process::CommandExt;
    let set = watched();
    // SAFETY: between fork and exec the child only empties its signal mask (async-signal-safe). Without it the
    // action would inherit the blocked stop signals (std does not reset the mask on every path) and ignore them.
    unsafe {
        command.pre_exec(|| {
            let mut empty = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = command
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the action: {e}"))?;
    let pid = child.id() as libc::pid_t;
    // The child is waited for below with waitpid, never through `Child`.
    drop(child);
    let mut forwarded = vec![];
    let mut pids_limit = None;
    let refused_forks = pids_events().map(|(count, _)| count);
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: Duration::from_millis(200).as_nanos() as libc::c_long,
    };
    loop {
        // A fork refused by the container's process limit means a runaway (a fork bomb): it may never end by
        // itself, so everything but the agent is killed, until nothing is left to kill. Checked before reaping, so
        // an action that gave up after a refused fork is still reported as having hit the limit.
        if let (Some(before), Some((now, max))) = (refused_forks, pids_events()) {
            if now > before && pids_limit.is_none() {
                pids_limit = Some(max);
            }
        }
        if pids_limit.is_some() {
            // SAFETY: SIGKILL to every process this one may signal but itself (and the container's init).
            unsafe { libc::kill(-1, libc::SIGKILL) };
        }
        if let Some(ended) = reap(pid) {
            return Ok(Supervised {
                ended,
                forwarded,
                pids_limit,
            });
        }
        // SAFETY: waits for one of the blocked signals in `set`; `info` is ours.
        let signal = unsafe {
            let mut info = std::mem::zeroed::<libc::siginfo_t>();
            libc::sigtimedwait(&set, &mut info, &timeout)
        };
        if FORWARDED.contains(&signal) {
            // SAFETY: a signal to the action's process group (pid = pgid, set by process_group(0)).
            unsafe { libc::kill(-pid, signal) };
            forwarded.push(signal);
        }
        // SIGCHLD, a timeout or an interruption: the next turn reaps.
    }
}

/// The container's count of forks refused by its process limit (`pids.events`' `max`) and that limit
/// (`pids.max`), from cgroup v1 or v2; `None` when the container has no pids controller to read.
fn pids_events() -> Option<(u64, String)> {
    ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .find_map(|dir| {
            let events = std::fs::read_to_string(format!("{dir}/pids.events")).ok()?;
            let max = std::fs::read_to_string(format!("{dir}/pids.max")).unwrap_or_default();
            Some((events, max.trim().to_owned()))
        })
        .and_then(|(events, max)| Some((refused_forks(&events)?, max)))
}

/// The `max` counter of a `pids.events` file.
fn refused_forks(events: &str) -> Option<u64> {
    events
        .lines()
        .find_map(|line| line.strip_prefix("max "))
        .and_then(|n| n.trim().parse().ok())
}

/// Reaps every child that has ended; returns how `action` ended if it was among them.
fn reap(action: libc::pid_t) -> Option<Ended> {
    let mut ended = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on any child, without blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return ended;
        }
        if pid == action {
            ended = Some(if libc::WIFSIGNALED(status) {
                Ended::Signalled(libc::WTERMSIG(status))
            } else {
                Ended::Exited(libc::WEXITSTATUS(status))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_reported_by_name_and_as_the_shells_exit_code() {
        let killed = Supervised {
            ended: Ended::Signalled(libc::SIGTERM),
            forwarded: vec![libc::SIGTERM],
            pids_limit: None,
        };
        assert_eq!(killed.ended.exit_code(), 143);
        assert_eq!(
            killed.to_json(),
            json!({"code": null, "signal": "SIGTERM", "forwarded_signals": ["SIGTERM"]})
        );
        let exited = Supervised {
            ended: Ended::Exited(3),
            forwarded: vec![],
            pids_limit: None,
        };
        assert_eq!(exited.ended.exit_code(), 3);
        assert_eq!(
            exited.to_json(),
            json!({"code": 3, "signal": null, "forwarded_signals": []})
        );
        assert_eq!(signal_name(40), "SIG40");
        let bombed = Supervised {
            ended: Ended::Signalled(libc::SIGKILL),
            forwarded: vec![],
            pids_limit: Some("64".into()),
        };
        assert_eq!(bombed.to_json()["limit"], json!({"pids": "64"}));
    }

    #[test]
    fn refused_forks_are_read_from_pids_events() {
        assert_eq!(refused_forks("max 0\n"), Some(0));
        assert_eq!(refused_forks("max 34\n"), Some(34));
        assert_eq!(refused_forks(""), None);
    }
}
