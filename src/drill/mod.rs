//! The crash drill, shared by `runner bench crash` and `tests/crash.rs`: a `runner` process is stopped at one of
//! [`POINTS`] (`RUNNER_CRASH_POINT`, see [`crate::orchestrator::crash_point`]) and killed with SIGKILL; then the
//! next change on the same environment is run by a new `runner` (which reaps at start), and the invariants are
//! checked from the store and from Docker: nothing left by the runner's labels, every change and step ended (with a
//! reason unless it succeeded), every properties version whole, every step's patch there exactly when it succeeded.

mod fixture;
mod invariants;
mod process;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::events::ChangeState;
use crate::store::{ChangeFilter, Store, StoreError};
use fixture::{ENVIRONMENT, PROJECT};
pub use process::{Finished, Process, Runner};

/// Where the drill kills the runner, in the order a change meets them.
pub const POINTS: [&str; 10] = [
    "queued",
    "cloning",
    "building",
    "starting-services",
    "running",
    "applying-patches",
    "between-steps",
    "cancelling",
    "retrying",
    "serve-watching",
];

/// How long one command of the drill may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("the drill's fixture: {0}")]
    Fixture(String),
    #[error("`runner {command}`: {detail}")]
    Runner { command: String, detail: String },
    #[error("asking Docker: {0}")]
    Docker(String),
    #[error("reading the drill's store: {0}")]
    Store(#[from] StoreError),
    #[error("no crash point {0:?}: the points are {points}", points = POINTS.join(", "))]
    UnknownPoint(String),
}

/// One trial: where it was killed, how long it took to get there and to recover, what did not hold.
#[derive(Debug)]
pub struct Outcome {
    pub point: String,
    pub trial: usize,
    /// The change that was running when the runner died, and how it ended after the restart.
    pub change: Option<(String, ChangeState, Option<String>)>,
    /// From starting the runner to its crash point.
    pub to_crash: Duration,
    /// Containers, networks and volumes of the runner at the moment it died (what the restart had to remove).
    pub left_at_crash: usize,
    /// From starting the next runner to its change's end (start-up clean-up included).
    pub recovery: Duration,
    /// Every invariant that broke (empty: the trial passed).
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A data directory with the drill's project, driven through the `runner` binary at `exe`.
pub struct Drill {
    runner: Runner,
}

impl Drill {
    /// Creates the drill's repository, data directory, project and environment under `dir` (which must be empty
    /// or absent). The base runner image must exist (`runner image build-base`).
    pub async fn prepare(exe: PathBuf, dir: &Path) -> Result<Drill, DrillError> {
        let base = crate::runtime::base_image();
        let docker = crate::executor::docker::connect()
            .await
            .map_err(|e| DrillError::Docker(e.to_string()))?;
        if docker.inspect_image(&base).await.is_err() {
            return Err(DrillError::Docker(format!(
                "the base runner image {base} is missing: build it with `runner image build-base`"
            )));
        }
        let home = dir.join("home");
        std::fs::create_dir_all(&home)
            .map_err(|e| DrillError::Fixture(format!("{}: {e}", home.display())))?;
        let runner = Runner { exe, home };
        fixture::create(&runner, dir, &base).await?;
        Ok(Drill { runner })
    }

    pub fn home(&self) -> &Path {
        self.runner.home()
    }

    /// How the drill starts `runner` on its data directory (for tests that drive it otherwise).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// `runner change create` of `action` on the drill's environment.
    pub fn create_args(action: &str) -> Vec<&str> {
        create_args(action)
    }

    /// Kills the runner at `point`, restarts, and checks the invariants.
    pub async fn trial(&self, point: &str, trial: usize) -> Result<Outcome, DrillError> {
        if !POINTS.contains(&point) {
            return Err(DrillError::UnknownPoint(point.to_owned()));
        }
        let mut problems = Vec::new();
        let started = Instant::now();
        let (crashed, follower) = self.crash(point).await?;
        let to_crash = started.elapsed();
        let store_id = Store::open(self.home()).await?.id().to_owned();
        let left_at_crash = invariants::left_in_docker(&store_id).await?.len();
        if left_at_crash == 0 && matches!(point, "starting-services" | "running" | "cancelling") {
            problems.push(format!(
                "no container was there when the runner died at {point}: the point is not where it claims"
            ));
        }
        let crashed = match crashed {
            Some(id) => Some(id),
            None => self.newest_change().await?,
        };
        if let Some(follower) = follower {
            problems.extend(follower);
        }

        let started = Instant::now();
        let next = self
            .runner
            .run(&create_args("noop"), LIMIT)
            .await
            .map(|done| {
                (!done.success).then(|| {
                    format!(
                        "the next change on the environment did not succeed:\n{}",
                        done.transcript
                    )
                })
            })
            .unwrap_or_else(|e| Some(format!("the next change on the environment: {e}")));
        let recovery = started.elapsed();
        problems.extend(next);

        let store = Store::open(self.home()).await?;
        problems.extend(invariants::store_problems(&store).await?);
        let left = invariants::left_in_docker(store.id()).await?;
        if !left.is_empty() {
            problems.push(format!("left in Docker: {}", left.join(", ")));
        }
        let change = match crashed {
            Some(id) => {
                let c = store.change(&id).await?;
                if point == "cancelling" && c.state != ChangeState::Cancelled {
                    problems.push(format!(
                        "change {id} was cancelled before its runner died but ended {}",
                        c.state
                    ));
                }
                if c.reason.as_deref().unwrap_or("").is_empty() {
                    problems.push(format!(
                        "change {id}, whose runner died, ended {} without saying so",
                        c.state
                    ));
                }
                Some((c.id, c.state, c.reason))
            }
            None => {
                problems.push("no change was created before the crash".into());
                None
            }
        };
        Ok(Outcome {
            point: point.to_owned(),
            trial,
            change,
            to_crash,
            left_at_crash,
            recovery,
            problems,
        })
    }

    /// Starts what reaches `point`, waits for it there and kills it. Returns the change it was running (when it
    /// said) and, for `serve-watching`, what the follower got wrong when its server died.
    async fn crash(
        &self,
        point: &str,
    ) -> Result<(Option<String>, Option<Vec<String>>), DrillError> {
        let reached = format!("crash point {point} reached");
        match point {
            "retrying" => {
                let failed = self.runner.run(&create_args("fail"), LIMIT).await?;
                let id = created_id(&failed.transcript);
                let Some(id) = id else {
                    return Err(DrillError::Runner {
                        command: create_args("fail").join(" "),
                        detail: format!("no change id printed:\n{}", failed.transcript),
                    });
                };
                let mut retry = self.runner.start(&["change", "retry", &id], Some(point))?;
                retry.wait_for(&reached, LIMIT).await?;
                retry.kill9().await?;
                Ok((Some(id), None))
            }
            "cancelling" => {
                let mut run = self.runner.start(&create_args("slow"), Some(point))?;
                let line = run.wait_for(" created at ", LIMIT).await?;
                let id = created_id(&line);
                run.wait_for("drill sleeping", LIMIT).await?;
                if let Some(id) = &id {
                    let cancel = self.runner.run(&["change", "cancel", id], LIMIT).await?;
                    if !cancel.success {
                        return Err(DrillError::Runner {
                            command: format!("change cancel {id}"),
                            detail: cancel.transcript,
                        });
                    }
                }
                run.wait_for(&reached, LIMIT).await?;
                run.kill9().await?;
                Ok((id, None))
            }
            "serve-watching" => self.crash_serve(&reached).await,
            _ => {
                let action = if point == "starting-services" {
                    "with_service"
                } else {
                    "drill"
                };
                let mut run = self.runner.start(&create_args(action), Some(point))?;
                let line = run.wait_for(" created at ", LIMIT).await?;
                run.wait_for(&reached, LIMIT).await?;
                run.kill9().await?;
                Ok((created_id(&line), None))
            }
        }
    }

    /// `runner serve` with a client following a change through it; the server is killed while it streams.
    async fn crash_serve(
        &self,
        reached: &str,
    ) -> Result<(Option<String>, Option<Vec<String>>), DrillError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| DrillError::Fixture(format!("no free port: {e}")))?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut serve = self
            .runner
            .start(&["serve", "--listen", &listen], Some("serve-watching"))?;
        let deadline = Instant::now() + LIMIT;
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            if Instant::now() > deadline {
                return Err(DrillError::Runner {
                    command: format!("serve --listen {listen}"),
                    detail: format!("never listened:\n{}", serve.transcript()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let server = format!("http://{listen}");
        let mut args = vec!["--server", server.as_str()];
        args.extend(create_args("slow"));
        let log = self
            .home()
            .join(format!("follower-{}.log", uuid::Uuid::new_v4().simple()));
        let follower = self.runner.start_logged(&args, &log)?;
        serve.wait_for(reached, LIMIT).await?;
        let served = serve.transcript();
        serve.kill9().await?;
        let followed = follower.finish(Duration::from_secs(30)).await;
        let id = followed
            .as_ref()
            .ok()
            .and_then(|f| created_id(&f.transcript));
        let mut problems = Vec::new();
        match followed {
            Ok(done) if done.success => {
                problems.push("the follower of a change whose server died exited 0".to_owned())
            }
            Ok(done) => {
                let names_change = id.as_deref().is_some_and(|id| {
                    done.transcript
                        .lines()
                        .any(|l| l.contains("lost") && l.contains(id))
                });
                if !names_change || !done.transcript.contains("show-logs --follow") {
                    problems.push(format!(
                        "the follower whose server died ({}) did not say which change it followed and how to \
                         re-attach:\n{}\n(the server had printed:\n{served})",
                        done.status, done.transcript
                    ));
                }
            }
            Err(e) => problems.push(format!("the follower whose server died: {e}")),
        }
        Ok((id, Some(problems)))
    }

    /// Removes whatever a failed trial left in Docker under this data directory's label.
    pub async fn clean_up(&self) -> Result<(), DrillError> {
        let store = Store::open(self.home()).await?;
        invariants::remove_all(store.id()).await
    }

    async fn newest_change(&self) -> Result<Option<String>, DrillError> {
        let store = Store::open(self.home()).await?;
        let changes = store
            .list_changes(&ChangeFilter {
                limit: 1,
                ..Default::default()
            })
            .await?;
        Ok(changes.into_iter().next().map(|c| c.id))
    }
}

fn create_args(action: &str) -> Vec<&str> {
    vec![
        "change",
        "create",
        "--project",
        PROJECT,
        "--environment",
        ENVIRONMENT,
        "--git-rev",
        "main",
        "--action",
        action,
    ]
}

/// The id in `change ID created at …`.
fn created_id(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("change ")?;
        let (id, tail) = rest.split_once(' ')?;
        tail.starts_with("created at ").then(|| id.to_owned())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_created_line_names_the_change() {
        assert_eq!(
            super::created_id("noise\nchange 1b2c created at abc (main)\n").as_deref(),
            Some("1b2c")
        );
        assert_eq!(super::created_id("change cancel requested"), None);
    }
}
