//! `runner bench build|step`: measures the runner against the docker CLI doing the same work, in the same run
//! (the docker CLI appears here only as the yardstick, never in the product).

use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::buildkit::{self, BuildRequest, DockerEndpoint};
use crate::error::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Step image builds: cold and cache-hit, ours vs `docker build`, for a 2 MB and a 200 MB repository.
    Build {
        /// Repository sizes in MB.
        #[arg(long, value_delimiter = ',', default_value = "2,200")]
        sizes: Vec<u64>,
        /// Repetitions of each cached measurement (the median is shown).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// A no-op step end to end vs `docker build` + `docker run --rm` and vs bare `docker run --rm`; 20 parallel vs
    /// 20 sequential children.
    Step {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The example project to run (a folder turned into a git repository).
        #[arg(long, default_value = "fixtures/demo")]
        fixture: PathBuf,
        /// Adds a file of this many MB of incompressible data to the repository (real projects are not tiny, and
        /// the loop's `docker build` uploads the whole context every time).
        #[arg(long, default_value_t = 0)]
        repo_mb: u64,
    },
    /// Log ingestion: a step printing 1, 15 and 50 MB of lines → time from its exit to the change's end, store
    /// growth per log byte, `show-logs` time and peak RSS, beside writing the same bytes to a file.
    Logs {
        /// Output sizes in MB.
        #[arg(long, value_delimiter = ',', default_value = "1,15,50")]
        sizes: Vec<u64>,
    },
    /// The gRPC server under load on loopback: concurrent WatchChange streams plus a steady rate of GetChange
    /// calls; prints latency percentiles and the process's RSS before and after.
    Grpc {
        #[arg(long, default_value_t = 200)]
        watchers: usize,
        /// GetChange calls per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        #[arg(long, default_value = "60s", value_parser = crate::actions::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "fixtures/demo")]
        fixture: PathBuf,
    },
    /// What the store costs a step: SQLite in one process beside a shared PostgreSQL with 1, 2 and 3 concurrent
    /// workers (ms of store work per step, statements and transactions per step; goal on PostgreSQL: at most
    /// 10 ms).
    Store {
        /// Steps per configuration.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Steps of each change (sequential): the change-level work is spread over them.
        #[arg(long, default_value_t = 10)]
        change_steps: usize,
        /// Rounds per configuration (the median is shown).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// A scratch PostgreSQL database to measure (a project named bench-… is added to it).
        #[arg(long)]
        postgres: Option<String>,
    },
    /// The crash drill: the runner is killed with SIGKILL at each crash point, then restarted; prints per point
    /// whether every invariant held (nothing left in Docker, every change ended with a reason, no half-applied
    /// properties, the next change runs), the time to the crash and the time to recover.
    Crash {
        /// Trials per point.
        #[arg(long, default_value_t = 2)]
        trials: usize,
        /// Only these points (default: all).
        #[arg(long, value_delimiter = ',')]
        points: Vec<String>,
    },
    /// The web view's server-side render time of a page of 50 changes with many changes in the store, beside the
    /// same rows read and serialised as JSON (what `change list --output json` does); no Docker needed.
    Web {
        /// Changes in the store.
        #[arg(long, default_value_t = 10_000)]
        changes: usize,
        /// Renders timed per page (the median is shown).
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// How soon a follower learns of a stored event: woken by the store (SQLite's in-process signal, PostgreSQL's
    /// NOTIFY from another connection pool) beside polling every 200 ms, in the same run.
    Wakeups {
        /// Events timed per way of waking.
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// A scratch PostgreSQL database to measure (a project named bench-wake-… is added to it).
        #[arg(long)]
        postgres: Option<String>,
    },
    /// A fleet end to end: one-step changes per second run by 1, 2 and 3 `runner worker` processes (each its own
    /// data directory) sharing a PostgreSQL store, beside one worker on SQLite, measured in the same run.
    Fleet {
        /// Timed changes per configuration (after an untimed warm-up round), each on its own environment.
        #[arg(long, default_value_t = 24)]
        changes: usize,
        /// Changes each worker runs at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// A scratch PostgreSQL database to measure (projects named bench-fleet-… are added to it).
        #[arg(long)]
        postgres: Option<String>,
    },
}

pub(super) fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub(super) fn bench_error(message: impl Into<String>) -> Error {
    Error::Build {
        message: message.into(),
    }
}

/// Runs a docker CLI command (the yardstick), timed; fails loudly if it fails.
fn docker_cli(args: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| bench_error(format!("cannot run the docker CLI for the comparison: {e}")))?;
    if !out.status.success() {
        return Err(bench_error(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(start.elapsed())
}

pub(super) fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| bench_error(format!("git: {e}")))?;
    if !out.status.success() {
        return Err(bench_error(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub async fn run(home: &Path, cmd: BenchCommand) -> Result<()> {
    let scratch = home.join("bench");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|source| Error::Home {
        path: scratch.clone(),
        source,
    })?;
    let result = match cmd {
        BenchCommand::Build { sizes, runs } => build(&scratch, &sizes, runs.max(1)).await,
        BenchCommand::Step {
            runs,
            fixture,
            repo_mb,
        } => step(&scratch, &fixture, runs.max(1), repo_mb).await,
        BenchCommand::Logs { sizes } => super::bench_logs::run(&scratch, &sizes).await,
        BenchCommand::Grpc {
            watchers,
            rate,
            duration,
            fixture,
        } => grpc(&scratch, &fixture, watchers, rate.max(1), duration).await,
        BenchCommand::Store {
            steps,
            change_steps,
            rounds,
            postgres,
        } => {
            super::bench_store::run(
                &scratch,
                steps.max(1),
                change_steps.max(1),
                rounds.max(1),
                postgres.as_deref(),
            )
            .await
        }
        BenchCommand::Crash { trials, points } => {
            super::bench_crash::run(&scratch, trials.max(1), &points).await
        }
        BenchCommand::Fleet {
            changes,
            parallel,
            postgres,
        } => {
            super::bench_fleet::run(
                &scratch,
                changes.max(1),
                parallel.max(1),
                postgres.as_deref(),
            )
            .await
        }
        BenchCommand::Wakeups { trials, postgres } => {
            super::bench_wakeups::run(&scratch, trials.max(1), postgres.as_deref()).await
        }
        BenchCommand::Web { changes, runs } => {
            super::bench_web::run(&scratch, changes.max(1), runs.max(1)).await
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn build(scratch: &Path, sizes: &[u64], runs: usize) -> Result<()> {
    let endpoint = DockerEndpoint::from_env();
    let base = crate::runtime::base_image();
    println!("step image build, median of {runs} (ours: BuildKit over /session+/grpc; docker: `docker build` of the same context)");
    println!(
        "{:>8} {:>10} {:>11} {:>14} {:>14} {:>14} {:>8}",
        "repo", "repo.tar", "ours cold", "ours cache-hit", "docker cold", "docker cached", "ratio"
    );
    for &mb in sizes {
        let dir = scratch.join(format!("repo-{mb}mb"));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Home {
            path: dir.clone(),
            source,
        })?;
        write_random(&dir.join("blob.bin"), mb)?;
        git(&dir, &["init", "-q", "-b", "main"])?;
        git(&dir, &["add", "-A"])?;
        git(&dir, &["commit", "-q", "-m", "bench"])?;
        let mirror = crate::snapshot::Mirror::open(
            &scratch.join(format!("mirror-{mb}.git")),
            dir.to_str().unwrap_or_default(),
        )?;
        mirror.fetch()?;
        let sha = mirror.resolve("main")?;
        let tar_started = Instant::now();
        let tar = crate::snapshot::repo_tar(&mirror, &sha, &scratch.join("tars"))?;
        let tar_time = tar_started.elapsed();
        let plan = crate::context::plan(&crate::context::ContextInputs {
            repository_dockerfile: None,
            properties: &serde_json::json!({}),
            context: &serde_json::json!({}),
            git_rev: "main",
            git_sha: &sha,
            base_runner: &base,
            runner_user: "0:0",
        })?;
        let written = crate::context::write(
            &plan,
            &tar,
            &scratch.join(format!("ctx-{mb}")),
            std::time::UNIX_EPOCH + Duration::from_secs(1),
        )?;
        let tag = format!("runner-bench/ours:{mb}");
        let ours = || {
            let request = BuildRequest {
                context_dir: written.context_dir.clone().into(),
                dockerfile_dir: written.dockerfile_dir.clone().into(),
                dockerfile_name: "Dockerfile".into(),
                build_args: plan.build_args.clone(),
                tags: vec![tag.clone()],
                ..Default::default()
            };
            let endpoint = endpoint.clone();
            async move {
                let start = Instant::now();
                let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                buildkit::build(&endpoint, request, tx, CancellationToken::new()).await?;
                Ok::<_, Error>(start.elapsed())
            }
        };
        let cold = ours().await?;
        let mut hits = vec![];
        for _ in 0..runs {
            hits.push(ours().await?);
        }
        let hit = median(hits);
        // The same context for the docker CLI: it sends the whole directory as a tarball on every build.
        let docker_ctx = scratch.join(format!("docker-ctx-{mb}"));
        std::fs::create_dir_all(&docker_ctx).map_err(|source| Error::Home {
            path: docker_ctx.clone(),
            source,
        })?;
        for name in ["repo.tar", "step_context_env.json"] {
            let _ = std::fs::hard_link(written.context_dir.join(name), docker_ctx.join(name));
        }
        std::fs::write(docker_ctx.join("Dockerfile"), &plan.dockerfile).map_err(|source| {
            Error::Home {
                path: docker_ctx.clone(),
                source,
            }
        })?;
        let docker_tag = format!("runner-bench/docker:{mb}");
        let mut args: Vec<String> =
            vec!["build".into(), "-q".into(), "-t".into(), docker_tag.clone()];
        for (k, v) in &plan.build_args {
            args.push("--build-arg".into());
            args.push(format!("{k}={v}"));
        }
        args.push(docker_ctx.to_string_lossy().into_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let docker_cold = docker_cli(&args)?;
        let mut cached = vec![];
        for _ in 0..runs {
            cached.push(docker_cli(&args)?);
        }
        let docker_cached = median(cached);
        println!(
            "{:>6}MB {:>10} {:>11} {:>14} {:>14} {:>14} {:>7.2}x",
            mb,
            secs(tar_time),
            secs(cold),
            secs(hit),
            secs(docker_cold),
            secs(docker_cached),
            hit.as_secs_f64() / docker_cached.as_secs_f64()
        );
        let _ = docker_cli(&["rmi", "-f", &tag, &docker_tag]);
    }
    println!("ratio = ours cache-hit / docker cached (lower is better). A step whose content key matches skips even the cache-hit build.");
    Ok(())
}

/// The example project copied into a fresh git repository, with `extra_mb` of incompressible data added.
fn fixture_repo(scratch: &Path, fixture: &Path, extra_mb: u64) -> Result<PathBuf> {
    let repo = scratch.join("repo");
    let copy = Command::new("cp")
        .arg("-R")
        .arg(fixture)
        .arg(&repo)
        .status()
        .map_err(|e| bench_error(format!("cp: {e}")))?;
    if !copy.success() {
        return Err(bench_error(format!("cannot copy {}", fixture.display())));
    }
    if extra_mb > 0 {
        write_random(&repo.join("blob.bin"), extra_mb)?;
    }
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "bench"])?;
    Ok(repo)
}

/// Incompressible content, so neither side can cheat with compression.
fn write_random(path: &Path, mb: u64) -> Result<()> {
    let mut data = vec![0u8; (mb * 1024 * 1024) as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ mb ^ crate::orchestrator::lease::now_ms() as u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, &data).map_err(|source| Error::Home {
        path: path.to_owned(),
        source,
    })
}

async fn step(scratch: &Path, fixture: &Path, runs: usize, repo_mb: u64) -> Result<()> {
    let repo = fixture_repo(scratch, fixture, repo_mb)?;
    let app = App::open(&scratch.join("home")).await?;
    app.create_project("bench", "Bench", Some(repo.to_str().unwrap_or_default()))
        .await?;
    app.create_environment("bench", "env", "Env").await?;
    let orchestrator = crate::runtime::local(app).await?;
    let lease_stop = CancellationToken::new();
    let lease = orchestrator.hold_lease(lease_stop.clone()).await?;
    let change = |action: &'static str| {
        let orchestrator = orchestrator.clone();
        async move {
            let request = crate::orchestrator::CreateChange {
                project: "bench".into(),
                environment: "env".into(),
                git_rev: "main".into(),
                action: action.into(),
            };
            let start = Instant::now();
            let change = orchestrator.create_change(&request).await?;
            let change = orchestrator
                .run_change(&change.id, CancellationToken::new())
                .await?;
            if change.state != crate::events::ChangeState::Success {
                return Err(bench_error(format!(
                    "the bench change {} ended {}: {}",
                    change.id,
                    change.state,
                    change.reason.unwrap_or_default()
                )));
            }
            let image = orchestrator
                .app()
                .store
                .steps(&change.id)
                .await?
                .into_iter()
                .find_map(|s| s.image_id)
                .unwrap_or_default();
            Ok::<_, Error>((start.elapsed(), image))
        }
    };
    // Warm up: the first change builds the step image.
    let (_, image) = change("noop").await?;
    let mut ours = vec![];
    for _ in 0..runs {
        ours.push(change("noop").await?.0);
    }
    let ours = median(ours);

    // The yardstick: build the same step image with the docker CLI (cached) and run it once, discarded.
    let home = scratch.join("home");
    let tars = crate::cache::repo_tars(&home);
    let tar = std::fs::read_dir(&tars)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path())
        .ok_or_else(|| bench_error("no repo.tar was built"))?;
    let ctx = scratch.join("docker-ctx");
    std::fs::create_dir_all(&ctx).map_err(|source| Error::Home {
        path: ctx.clone(),
        source,
    })?;
    let _ = std::fs::hard_link(&tar, ctx.join("repo.tar"));
    std::fs::write(ctx.join("step_context_env.json"), b"{}\n").map_err(|source| Error::Home {
        path: ctx.clone(),
        source,
    })?;
    // The classic builder the docker CLI has here cannot do secret mounts: the loop builds the default Dockerfile.
    std::fs::write(ctx.join("Dockerfile"), crate::context::DEFAULT_DOCKERFILE).map_err(
        |source| Error::Home {
            path: ctx.clone(),
            source,
        },
    )?;
    let base = crate::runtime::base_image();
    let build_args = ["--build-arg", &format!("OPSCHAIN_BASE_RUNNER={base}")].map(str::to_owned);
    let mut build: Vec<&str> = vec!["build", "-q", "-t", "runner-bench/loop:1"];
    build.extend(build_args.iter().map(String::as_str));
    let ctx_arg = ctx.to_string_lossy().into_owned();
    build.push(&ctx_arg);
    docker_cli(&build)?;
    let run_args = [
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        "runner-bench/loop:1",
        "-c",
        "true",
    ];
    let mut looped = vec![];
    let mut bare = vec![];
    for _ in 0..runs {
        looped.push(docker_cli(&build)? + docker_cli(&run_args)?);
        bare.push(docker_cli(&[
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            &image,
            "-c",
            "true",
        ])?);
    }
    let (looped, bare) = (median(looped), median(bare));
    let _ = docker_cli(&["rmi", "-f", "runner-bench/loop:1"]);

    let (parallel, _) = change("fan20_parallel").await?;
    let (sequential, _) = change("fan20_sequential").await?;
    lease_stop.cancel();
    let _ = lease.await;

    println!(
        "no-op step end to end, cached image, median of {runs}, repository {} + {repo_mb} MB:",
        fixture.display()
    );
    println!("  runner change (1 step)           {}", secs(ours));
    println!(
        "  docker build + docker run --rm   {}   ours/loop = {:.2}x (goal <= 0.6x)",
        secs(looped),
        ours.as_secs_f64() / looped.as_secs_f64()
    );
    println!(
        "  bare docker run --rm             {}   ours/bare = {:.2}x (goal <= 1.3x)",
        secs(bare),
        ours.as_secs_f64() / bare.as_secs_f64()
    );
    println!("20 no-op children:");
    println!("  parallel                         {}", secs(parallel));
    println!(
        "  sequential                       {}   parallel/sequential = {:.2}x",
        secs(sequential),
        parallel.as_secs_f64() / sequential.as_secs_f64()
    );
    Ok(())
}

/// Resident set size of this process, from /proc.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn grpc(
    scratch: &Path,
    fixture: &Path,
    watchers: usize,
    rate: u32,
    duration: Duration,
) -> Result<()> {
    use crate::grpc::pb;
    let repo = fixture_repo(scratch, fixture, 0)?;
    let app = App::open(&scratch.join("home")).await?;
    app.create_project("bench", "Bench", Some(repo.to_str().unwrap_or_default()))
        .await?;
    app.create_environment("bench", "env", "Env").await?;
    app.create_environment("bench", "other", "Other").await?;
    let orchestrator = crate::runtime::local(app).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| Error::Home {
            path: "127.0.0.1:0".into(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Home {
        path: "listener".into(),
        source,
    })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::grpc::run(
        listener,
        orchestrator,
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_lazy();
    let mut changes = pb::change_service_client::ChangeServiceClient::new(channel.clone());
    // Real changes: the watchers follow one that runs for the whole load (its step sleeps); GetChange reads all.
    let mut ids = vec![];
    for action in ["sleep", "noop", "noop"] {
        let request = pb::CreateChangeRequest {
            project: "bench".into(),
            environment: if action == "sleep" { "env" } else { "other" }.into(),
            git_rev: "main".into(),
            action: action.into(),
            ..Default::default()
        };
        ids.push(
            changes
                .create_change(request)
                .await
                .map_err(|s| bench_error(s.to_string()))?
                .into_inner()
                .id,
        );
    }
    let rss_before = rss_mb();
    let deadline = Instant::now() + duration;
    // Watchers: each opens a stream on the running change and holds it (history first, then live events) until the
    // change ends.
    let watch_tasks: Vec<_> = (0..watchers)
        .map(|_| {
            let (mut client, id) = (
                pb::change_service_client::ChangeServiceClient::new(channel.clone()),
                ids[0].clone(),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let request = pb::WatchChangeRequest {
                    id,
                    after_seq: 0,
                    history_only: false,
                };
                let Ok(response) = client.watch_change(request).await else {
                    return (0u64, 0u64, vec![]);
                };
                let mut stream = response.into_inner();
                let (mut events, mut first_event) = (0u64, vec![]);
                while let Ok(Some(_)) = stream.message().await {
                    if first_event.is_empty() {
                        first_event.push(started.elapsed());
                    }
                    events += 1;
                }
                (1u64, events, first_event)
            })
        })
        .collect();
    // A steady rate of GetChange calls, each on its own task so a slow answer does not slow the rate.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut calls = vec![];
    let mut n = 0usize;
    while Instant::now() < deadline {
        tick.tick().await;
        let (mut client, id) = (changes.clone(), ids[n % ids.len()].clone());
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            client
                .get_change(pb::GetChangeRequest { id, attempt: 0 })
                .await
                .map(|_| started.elapsed())
        }));
        n += 1;
    }
    let (mut latencies, mut failures) = (vec![], 0u64);
    for call in calls {
        match call.await {
            Ok(Ok(latency)) => latencies.push(latency),
            _ => failures += 1,
        }
    }
    // End the watched change: every stream then gets its final event and closes.
    let _ = changes
        .cancel_change(pb::CancelChangeRequest {
            id: ids[0].clone(),
            ..Default::default()
        })
        .await;
    let (mut streams, mut events, mut firsts) = (0, 0, vec![]);
    for task in watch_tasks {
        if let Ok((s, e, f)) = task.await {
            streams += s;
            events += e;
            firsts.extend(f);
        }
    }
    let rss_after = rss_mb();
    let _ = stop.send(());
    let _ = server.await;
    latencies.sort();
    firsts.sort();
    println!("gRPC under load for {:.0} s on {addr}: {watchers} concurrent WatchChange streams, {rate} GetChange/s", duration.as_secs_f64());
    println!(
        "  GetChange        {} calls, {failures} failed, p50 {:.2} ms, p99 {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!("  WatchChange      {streams} streams held to the end, {events} events, first event p50 {:.2} ms, p99 {:.2} ms", percentile(&firsts, 0.5).as_secs_f64() * 1e3, percentile(&firsts, 0.99).as_secs_f64() * 1e3);
    println!("  RSS (server and load in one process)   before {rss_before:.1} MB, after {rss_after:.1} MB");
    Ok(())
}
