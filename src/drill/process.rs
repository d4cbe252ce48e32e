//! A `runner` process the drill drives: started with piped output, its lines read as they come, waited for a
//! given line, and killed with SIGKILL (then waited on, so its pid is gone and a reaper sees it dead).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::DrillError;

/// How the drill starts `runner`: which binary, which data directory.
#[derive(Debug, Clone)]
pub struct Runner {
    pub exe: PathBuf,
    pub home: PathBuf,
}

/// What a finished command printed, and whether it succeeded.
#[derive(Debug)]
pub struct Finished {
    pub success: bool,
    pub status: std::process::ExitStatus,
    pub transcript: String,
}

impl Runner {
    /// A `runner` command on the drill's data directory, nothing inherited that would redirect it elsewhere.
    fn command(&self, args: &[&str], crash_point: Option<&str>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("RUNNER_SERVER")
            .env_remove(crate::orchestrator::crash_point::VARIABLE)
            .env("RUNNER_STOP_GRACE", "2s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(point) = crash_point {
            cmd.env(crate::orchestrator::crash_point::VARIABLE, point);
        }
        cmd
    }

    /// Starts `runner ARGS`, stopping at `crash_point` if given.
    pub fn start(&self, args: &[&str], crash_point: Option<&str>) -> Result<Process, DrillError> {
        let mut child =
            self.command(args, crash_point)
                .spawn()
                .map_err(|e| DrillError::Runner {
                    command: args.join(" "),
                    detail: format!("cannot start {}: {e}", self.exe.display()),
                })?;
        let (tx, lines) = mpsc::unbounded_channel();
        let transcript = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tokio::spawn(forward(stdout, tx.clone(), transcript.clone()));
        tokio::spawn(forward(stderr, tx, transcript.clone()));
        Ok(Process {
            command: args.join(" "),
            child,
            lines,
            transcript,
        })
    }

    /// Starts `runner ARGS` with its stdout and stderr going to the file `log` (read when it ends: nothing of its
    /// output can be missed, whenever it exits).
    pub fn start_logged(&self, args: &[&str], log: &Path) -> Result<Logged, DrillError> {
        let failed = |detail: String| DrillError::Runner {
            command: args.join(" "),
            detail,
        };
        let file = std::fs::File::create(log)
            .map_err(|e| failed(format!("cannot create {}: {e}", log.display())))?;
        let mut cmd = self.command(args, None);
        cmd.stdout(
            file.try_clone()
                .map_err(|e| failed(format!("{}: {e}", log.display())))?,
        )
        .stderr(file);
        let child = cmd
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", self.exe.display())))?;
        Ok(Logged {
            command: args.join(" "),
            child,
            log: log.to_owned(),
        })
    }

    /// Runs `runner ARGS` to its end (killed after `limit`).
    pub async fn run(&self, args: &[&str], limit: Duration) -> Result<Finished, DrillError> {
        let mut process = self.start(args, None)?;
        process.finish(limit).await
    }

    pub fn home(&self) -> &Path {
        &self.home
    }
}

async fn forward(
    pipe: impl tokio::io::AsyncRead + Unpin,
    tx: mpsc::UnboundedSender<String>,
    transcript: Arc<Mutex<String>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut t) = transcript.lock() {
            t.push_str(&line);
            t.push('\n');
        }
        let _ = tx.send(line);
    }
}

/// A running `runner` process whose output goes to a file.
pub struct Logged {
    command: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Logged {
    /// Waits (at most `limit`) for it to end; kills it if it does not. Its output is the file's content.
    pub async fn finish(mut self, limit: Duration) -> Result<Finished, DrillError> {
        let waited = tokio::time::timeout(limit, self.child.wait()).await;
        let transcript = std::fs::read_to_string(&self.log).unwrap_or_default();
        let failed = |detail: String| DrillError::Runner {
            command: self.command.clone(),
            detail: format!("{detail}; it printed:\n{transcript}"),
        };
        match waited {
            Ok(Ok(status)) => Ok(Finished {
                success: status.success(),
                status,
                transcript: transcript.clone(),
            }),
            Ok(Err(e)) => Err(failed(format!("waiting for it failed: {e}"))),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(failed(format!("it did not end within {limit:?} (killed)")))
            }
        }
    }
}

/// A running `runner` process.
pub struct Process {
    command: String,
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    transcript: Arc<Mutex<String>>,
}

impl Process {
    /// Waits (at most `limit`) for a line containing `needle` on stdout or stderr; returns that line.
    pub async fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<String, DrillError> {
        let found = tokio::time::timeout(limit, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(self.failed(format!("it ended without printing {needle:?}"))),
            Err(_) => Err(self.failed(format!("{needle:?} not printed within {limit:?}"))),
        }
    }

    /// Its process id (`None` once it has been waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends it `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<(), DrillError> {
        let pid = self
            .pid()
            .ok_or_else(|| self.failed("it has ended".into()))?;
        // SAFETY: kill(2) with a pid of our own child that has not been waited for.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(self.failed(format!(
                "kill -{signal}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Everything it printed so far.
    pub fn transcript(&self) -> String {
        self.transcript
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    fn failed(&self, detail: String) -> DrillError {
        DrillError::Runner {
            command: self.command.clone(),
            detail: format!("{detail}; it printed:\n{}", self.transcript()),
        }
    }

    /// SIGKILL, then waits for it, so its pid no longer exists.
    pub async fn kill9(mut self) -> Result<(), DrillError> {
        self.child
            .kill()
            .await
            .map_err(|e| self.failed(format!("kill -9 failed: {e}")))
    }

    /// What it printed and how it ended, if it has ended; `None` while it runs.
    pub async fn exited(&mut self) -> Result<Option<Finished>, DrillError> {
        match self.child.try_wait() {
            Ok(Some(_)) => self.finish(Duration::from_secs(5)).await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self.failed(format!("waiting for it failed: {e}"))),
        }
    }

    /// Waits (at most `limit`) for it to end by itself; kills it if it does not.
    pub async fn finish(&mut self, limit: Duration) -> Result<Finished, DrillError> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                // Its pipes close with it: the readers are done when the channel closes (bounded, in case a
                // process it started holds them open).
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while self.lines.recv().await.is_some() {}
                })
                .await;
                Ok(Finished {
                    success: status.success(),
                    status,
                    transcript: self.transcript(),
                })
            }
            Ok(Err(e)) => Err(self.failed(format!("waiting for it failed: {e}"))),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self.failed(format!("it did not end within {limit:?} (killed)")))
            }
        }
    }
}
