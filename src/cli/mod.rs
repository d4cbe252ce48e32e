//! The `runner` command line: parses flags (clap), calls the core API, renders results and events.
//! Exit codes: 0 success, 1 a failure the user can act on, 2 a usage error (clap's).

// First, so its `println!` and friends (which end quietly on a closed pipe) replace std's in every module below.
#[macro_use]
mod output;
mod bench;
mod bench_crash;
mod bench_fleet;
mod bench_logs;
mod bench_store;
mod bench_wakeups;
mod bench_web;
mod change;
mod logs;
mod remote;
mod render;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::app::{default_home, App, Scope};
use crate::error::{Error, Result};
use crate::properties;
use crate::secrets::{self, SecretValues};

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "Runs OpsChain-style changes: one freshly built image and one discarded container per step"
)]
pub struct Cli {
    /// Data directory (store, secrets, repository mirrors, image build cache).
    #[arg(long, global = true, env = "RUNNER_HOME")]
    home: Option<PathBuf>,
    /// The operator's policy file (grants of secrets and privileged features, step limits, RunStep rules);
    /// `$RUNNER_HOME/policy.toml` by default, where an absent file means the safe defaults.
    #[arg(long, global = true, env = "RUNNER_POLICY")]
    policy: Option<PathBuf>,
    /// The store: a PostgreSQL URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE) that several runners on
    /// several hosts share; unset, the SQLite store `runner.db` in the data directory.
    #[arg(
        long,
        global = true,
        env = "RUNNER_DATABASE_URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Send project, environment, properties, change and step commands to this `runner serve` (e.g.
    /// http://127.0.0.1:50051) instead of the local data directory.
    #[arg(long, global = true, env = "RUNNER_SERVER")]
    server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, global = true, env = "RUNNER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// --server.
    #[arg(long, global = true, env = "RUNNER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(long, global = true, env = "RUNNER_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
    /// How long a follower (change create/show-logs --follow, WatchChange, the web's live pages) waits for a
    /// wake-up before it looks at the store anyway (e.g. 500ms, 2s): on PostgreSQL notifications wake it and
    /// this is a safety net (default 2s); on SQLite it is how soon other processes' writes show (default 200ms).
    #[arg(long, global = true, env = "RUNNER_FOLLOW_FALLBACK", value_parser = crate::store::parse_fallback)]
    follow_fallback: Option<std::time::Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Projects and their properties.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Environments of a project and their properties.
    #[command(subcommand)]
    Environment(EnvironmentCommand),
    /// Named secrets for image builds and steps (values are never printed).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Changes: run an action of the project's repository against an environment.
    #[command(subcommand)]
    Change(change::ChangeCommand),
    /// Steps of changes.
    #[command(subcommand)]
    Step(change::StepCommand),
    /// Runner images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Helpers for working on a project repository.
    #[command(subcommand)]
    Dev(DevCommand),
    /// The build cache in the data directory and the runner's images.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Log maintenance: retention.
    #[command(subcommand)]
    Logs(logs::LogsCommand),
    /// Serve the gRPC API (and run the changes created through it). It also works as a worker of the fleet
    /// (see `runner worker`) unless --no-worker.
    Serve(ServeArgs),
    /// Run the changes queued in the store (`runner change create --enqueue`, from any host sharing the store)
    /// with this host's BuildKit and Docker, until SIGTERM/SIGINT/SIGHUP.
    Worker(WorkerArgs),
    /// Benchmarks against the docker CLI, measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build the base runner image offline from runner-image/, or, with --from, layer the runner's in-container
    /// parts onto a local image that has a POSIX shell (skipped when its inputs did not change; nothing is pulled).
    BuildBase {
        /// A local image (name[:tag] or image ID) to build the base from, e.g. debian:bookworm-slim.
        #[arg(long)]
        from: Option<String>,
        /// The name to give the result (default runner/opschain-runner-<name>:<tag> of --from).
        #[arg(long, requires = "from")]
        tag: Option<String>,
    },
    /// List the base runner images the runner built: name, source, image ID, size, age.
    List,
    /// Build the Docker-in-Docker image for `docker: dind` steps offline from this machine's docker.io (the first
    /// such step builds it too; skipped when its inputs did not change).
    BuildDind,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Remove cached repo.tars, repository trees, build contexts and runner-step/runner-service images that no
    /// unfinished change uses.
    Prune {
        /// Only what was last written (or an image created) longer ago than this, e.g. 7d, 12h.
        #[arg(long, value_parser = parse_age)]
        older_than: Option<std::time::Duration>,
        /// Keep the newest N images of each kind, whatever their age.
        #[arg(long, default_value_t = 0)]
        keep_images: usize,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A duration such as `30m`, `12h` or `7d`.
fn parse_age(text: &str) -> std::result::Result<std::time::Duration, String> {
    if let Some(days) = text.strip_suffix('d') {
        return days
            .parse::<u64>()
            .map(|d| std::time::Duration::from_secs(d * 86_400))
            .map_err(|_| format!("{text:?} is not a duration: give e.g. 7d, 12h, 30m or 90s"));
    }
    crate::actions::parse_duration(text)
        .map_err(|_| format!("{text:?} is not a duration: give e.g. 7d, 12h, 30m or 90s"))
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Write the default step runner Dockerfile to .opschain/Dockerfile of the current repository.
    CreateDockerfile {
        /// Overwrite an existing .opschain/Dockerfile.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "RUNNER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: std::net::SocketAddr,
    /// File holding the bearer token clients must send (required off loopback).
    #[arg(long, env = "RUNNER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// How long running changes may take to finish after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value = "30s", value_parser = crate::actions::parse_duration)]
    grace: std::time::Duration,
    /// Serve TLS with this PEM certificate (with --tls-key).
    #[arg(long, env = "RUNNER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "RUNNER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also serve the web view, /metrics, /healthz and /readyz on this address (off unless given, e.g.
    /// 127.0.0.1:8080; off loopback it needs the token).
    #[arg(long, env = "RUNNER_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// How the server logs to stderr: `text`, or `json` (one object a line, with the change_id and step_id of
    /// the change and step a line is about).
    #[arg(long, env = "RUNNER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Do not run queued changes (those `runner change create --enqueue` leaves for the fleet's workers).
    #[arg(long)]
    no_worker: bool,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    /// Changes run at once (each on its own environment).
    #[arg(long, env = "RUNNER_WORKER_PARALLEL", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: u16,
    /// How long running changes may take to finish after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value = "30s", value_parser = crate::actions::parse_duration)]
    grace: std::time::Duration,
}

#[derive(Args, Debug)]
struct ProjectArg {
    /// Project code.
    #[arg(long, env = "RUNNER_PROJECT")]
    project: String,
}

#[derive(Args, Debug)]
struct EnvironmentArgs {
    #[command(flatten)]
    project: ProjectArg,
    /// Environment code.
    #[arg(long, env = "RUNNER_ENVIRONMENT")]
    environment: String,
}

/// The properties verbs shared by projects and environments.
#[derive(Subcommand, Debug)]
enum PropertiesVerb<S: Args> {
    /// Print the properties document (JSON, alone on stdout).
    ShowProperties {
        #[command(flatten)]
        scope: S,
        /// A past version instead of the current one.
        #[arg(long)]
        version: Option<i64>,
    },
    /// Replace the properties with a JSON document (`-` reads stdin).
    SetProperties {
        #[command(flatten)]
        scope: S,
        #[arg(long)]
        file: PathBuf,
        /// Fail unless this is still the current version.
        #[arg(long)]
        if_version: Option<i64>,
    },
    /// Apply an RFC 6902 JSON Patch (`-` reads stdin).
    PatchProperties {
        #[command(flatten)]
        scope: S,
        #[arg(long)]
        file: PathBuf,
        /// Fail unless this is still the current version.
        #[arg(long)]
        if_version: Option<i64>,
    },
    /// List every version of the properties.
    PropertiesHistory {
        #[command(flatten)]
        scope: S,
    },
}

/// The base runner image verbs shared by projects and environments.
#[derive(Subcommand, Debug)]
enum BaseImageVerb<S: Args> {
    /// Show the base runner image the steps start from and which level decided it (environment, project or the
    /// operator's default).
    ShowBaseImage {
        #[command(flatten)]
        scope: S,
    },
    /// Set the base runner image the steps start from (e.g. one `runner image build-base --from` built), or
    /// --clear it; the operator's policy (`base_images`) decides which images changes may use.
    SetBaseImage {
        #[command(flatten)]
        scope: S,
        /// NAME[:TAG] or sha256:<image id>.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        image: Option<String>,
        /// Remove this level's setting (the level above decides again).
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCommand {
    /// Create a project.
    Create {
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// Git remote of the project's repository: https://…, ssh://…, user@host:path or a local path.
        #[arg(long)]
        git_remote: Option<String>,
        /// Name of the secret holding the remote's credential (HTTPS: GIT_USERNAME, GIT_TOKEN; SSH: GIT_SSH_KEY,
        /// GIT_SSH_PASSPHRASE); the operator must grant it to the project.
        #[arg(long)]
        git_credential: Option<String>,
    },
    /// List projects.
    List,
    /// Set the git remote of a project, and the secret holding its credential (none without --credential).
    SetGitRemote {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        url: String,
        /// Name of the secret holding the remote's credential.
        #[arg(long)]
        credential: Option<String>,
    },
    /// Fetch the project's repository from its remote now.
    Fetch {
        #[command(flatten)]
        project: ProjectArg,
    },
    #[command(flatten)]
    Properties(PropertiesVerb<ProjectArg>),
    #[command(flatten)]
    BaseImage(BaseImageVerb<ProjectArg>),
}

#[derive(Subcommand, Debug)]
enum EnvironmentCommand {
    /// Create an environment in a project.
    Create {
        #[command(flatten)]
        project: ProjectArg,
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
    },
    /// List a project's environments.
    List {
        #[command(flatten)]
        project: ProjectArg,
    },
    #[command(flatten)]
    Properties(PropertiesVerb<EnvironmentArgs>),
    #[command(flatten)]
    BaseImage(BaseImageVerb<EnvironmentArgs>),
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Add or replace keys of a secret (creating it).
    Set {
        name: String,
        /// KEY=VALUE pairs.
        entries: Vec<String>,
        /// Read KEY=VALUE lines from this file.
        #[arg(long)]
        from_env_file: Option<PathBuf>,
    },
    /// List secrets with their keys (never values).
    List,
    /// Delete a secret.
    Delete { name: String },
}

trait ToScope {
    fn scope(&self) -> Scope;
}

impl ToScope for ProjectArg {
    fn scope(&self) -> Scope {
        Scope::Project {
            project: self.project.clone(),
        }
    }
}

impl ToScope for EnvironmentArgs {
    fn scope(&self) -> Scope {
        Scope::Environment {
            project: self.project.project.clone(),
            environment: self.environment.clone(),
        }
    }
}

/// Entry point of the `runner` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(&cli.command, Command::Serve(args) if args.log_format == "json"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", crate::error::error_text(&err));
            ExitCode::from(1)
        }
    }
}

fn init_tracing(json: bool) {
    // JSON logs are for a log pipeline: what the server's changes do (info) is what it is there to collect.
    let default = if json { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        // The innermost span's fields (a step's span holds change_id and step_id) go on every line.
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

async fn run(cli: Cli) -> Result<()> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    let out = cli.output;
    if let Some(fallback) = cli.follow_fallback {
        crate::store::set_default_fallback(fallback);
    }
    match cli.command {
        Command::Dev(DevCommand::CreateDockerfile { force }) => {
            let cwd = std::env::current_dir().map_err(|source| Error::ReadFile {
                path: ".".into(),
                source,
            })?;
            let path = crate::context::write_default_dockerfile(&cwd, force)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Image(ImageCommand::BuildBase { from: None, .. }) => {
            build_image(&home, OfflineImage::Base).await
        }
        Command::Image(ImageCommand::BuildBase {
            from: Some(from),
            tag,
        }) => build_image(&home, OfflineImage::Layered { from, tag }).await,
        Command::Image(ImageCommand::BuildDind) => build_image(&home, OfflineImage::Dind).await,
        Command::Image(ImageCommand::List) => {
            let docker = crate::executor::docker::connect().await?;
            render::base_images(out, &crate::image::layered::list(&docker).await?);
            Ok(())
        }
        Command::Worker(args) => worker(&home, cli.policy.as_deref(), cli.database.as_deref(), args).await,
        Command::Serve(args) => serve(&home, cli.policy.as_deref(), cli.database.as_deref(), args).await,
        Command::Cache(CacheCommand::Prune {
            older_than,
            keep_images,
            dry_run,
        }) => {
            let options = crate::cache::prune::PruneOptions {
                older_than,
                keep_images,
                dry_run,
            };
            prune(&open_app(&home, cli.policy.as_deref(), cli.database.as_deref()).await?, &options, out).await
        }
        Command::Bench(cmd) => bench::run(&home, cmd).await,
        Command::Secret(_) if cli.server.is_some() => Err(Error::InvalidArgument {
            what: "command for --server",
            value: "secret".into(),
            expected: "secrets never travel over the API: manage them with `runner secret` on the server's host",
        }),
        Command::Secret(cmd) => secret(&open_app(&home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd),
        Command::Logs(_) if cli.server.is_some() => Err(Error::InvalidArgument {
            what: "command for --server",
            value: "logs".into(),
            expected: "log retention is the operator's: run `runner logs prune` on the server's host",
        }),
        Command::Logs(cmd) => logs::logs(&open_app(&home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd, out).await,
        Command::Change(cmd) => match &cli.server {
            Some(url) => {
                change::refuse_with_server(&cmd)?;
                change::change_remote(remote::Remote::connect(url, cli.token.clone(), cli.tls_ca.as_deref()).await?, cmd, out).await
            }
            None => change::change(open_app(&home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd, out).await,
        },
        Command::Step(cmd) => match &cli.server {
            Some(url) => change::step_remote(remote::Remote::connect(url, cli.token.clone(), cli.tls_ca.as_deref()).await?, cmd, out).await,
            None => change::step(open_app(&home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd, out).await,
        },
        Command::Project(cmd) => project(&backend(&cli.server, cli.token.clone(), cli.tls_ca.as_deref(), &home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd, out).await,
        Command::Environment(cmd) => environment(&backend(&cli.server, cli.token.clone(), cli.tls_ca.as_deref(), &home, cli.policy.as_deref(), cli.database.as_deref()).await?, cmd, out).await,
    }
}

async fn backend(
    server: &Option<String>,
    token: Option<String>,
    tls_ca: Option<&Path>,
    home: &Path,
    policy: Option<&Path>,
    database: Option<&str>,
) -> Result<remote::Backend> {
    Ok(match server {
        Some(url) => remote::Backend::Remote(remote::Remote::connect(url, token, tls_ca).await?),
        None => remote::Backend::Local(open_app(home, policy, database).await?),
    })
}

/// Opens the data directory under the operator's policy: `--policy FILE` (which must exist) or
/// `home/policy.toml` (absent = defaults).
async fn open_app(home: &Path, policy: Option<&Path>, database: Option<&str>) -> Result<App> {
    let policy = crate::policy::Policy::load_from(policy, home)?;
    App::open_with_store(home, policy, database).await
}

async fn project(app: &remote::Backend, cmd: ProjectCommand, out: Output) -> Result<()> {
    match cmd {
        ProjectCommand::Create {
            code,
            name,
            git_remote,
            git_credential,
        } => {
            let project = app
                .create_project(
                    &code,
                    &name,
                    git_remote.as_deref(),
                    git_credential.as_deref(),
                )
                .await?;
            render::created(out, "project", &project.code, &project);
        }
        ProjectCommand::List => render::projects(out, &app.list_projects().await?),
        ProjectCommand::SetGitRemote {
            project,
            url,
            credential,
        } => {
            let project = app
                .set_git_remote(&project.project, &url, credential.as_deref())
                .await?;
            render::created(out, "git remote of project", &project.code, &project);
        }
        ProjectCommand::Fetch { project } => {
            render::fetched(out, &app.fetch_project(&project.project).await?);
        }
        ProjectCommand::Properties(verb) => properties_verb(app, verb, out).await?,
        ProjectCommand::BaseImage(verb) => base_image_verb(app, verb, out).await?,
    }
    Ok(())
}

async fn environment(app: &remote::Backend, cmd: EnvironmentCommand, out: Output) -> Result<()> {
    match cmd {
        EnvironmentCommand::Create {
            project,
            code,
            name,
        } => {
            let env = app
                .create_environment(&project.project, &code, &name)
                .await?;
            render::created(
                out,
                "environment",
                &format!("{}/{}", env.project_code, env.code),
                &env,
            );
        }
        EnvironmentCommand::List { project } => {
            render::environments(out, &app.list_environments(&project.project).await?)
        }
        EnvironmentCommand::Properties(verb) => properties_verb(app, verb, out).await?,
        EnvironmentCommand::BaseImage(verb) => base_image_verb(app, verb, out).await?,
    }
    Ok(())
}

async fn base_image_verb<S: Args + ToScope>(
    app: &remote::Backend,
    verb: BaseImageVerb<S>,
    out: Output,
) -> Result<()> {
    let base = match verb {
        BaseImageVerb::ShowBaseImage { scope } => app.base_image(&scope.scope()).await?,
        BaseImageVerb::SetBaseImage { scope, image, .. } => {
            app.set_base_image(&scope.scope(), image.as_deref()).await?
        }
    };
    render::base_image(out, &base);
    Ok(())
}

async fn properties_verb<S: Args + ToScope>(
    app: &remote::Backend,
    verb: PropertiesVerb<S>,
    out: Output,
) -> Result<()> {
    match verb {
        PropertiesVerb::ShowProperties { scope, version } => {
            let props = app.properties(&scope.scope(), version).await?;
            render::json(&props.document);
        }
        PropertiesVerb::SetProperties {
            scope,
            file,
            if_version,
        } => {
            let text = read_input(&file)?;
            let document = properties::parse_document(&file.display().to_string(), &text)?;
            let written = app
                .set_properties(&scope.scope(), document, if_version)
                .await?;
            render::version_written(out, &written);
        }
        PropertiesVerb::PatchProperties {
            scope,
            file,
            if_version,
        } => {
            let text = read_input(&file)?;
            let patch = properties::parse_patch(&file.display().to_string(), &text)?;
            let written = app
                .patch_properties(&scope.scope(), &patch, if_version)
                .await?;
            render::version_written(out, &written);
        }
        PropertiesVerb::PropertiesHistory { scope } => {
            render::history(out, &app.properties_history(&scope.scope()).await?)
        }
    }
    Ok(())
}

fn secret(app: &App, cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Set {
            name,
            entries,
            from_env_file,
        } => {
            let mut values = match &from_env_file {
                Some(path) => secrets::read_env_file(path)?,
                None => SecretValues::default(),
            };
            for entry in &entries {
                let (key, value) = secrets::parse_entry(entry)?;
                values.0.insert(key, value);
            }
            if values.0.is_empty() {
                return Err(Error::InvalidArgument {
                    what: "secret entries",
                    value: String::new(),
                    expected: "give KEY=VALUE pairs or --from-env-file FILE",
                });
            }
            let keys = values.0.len();
            app.secrets.set(&name, values)?;
            eprintln!("secret {name}: {keys} key(s) set");
        }
        SecretCommand::List => {
            for (name, keys) in app.secrets.list()? {
                println!("{name}\t{}", keys.join(","));
            }
        }
        SecretCommand::Delete { name } => {
            app.secrets.delete(&name)?;
            eprintln!("secret {name} deleted");
        }
    }
    Ok(())
}

/// The images the runner builds offline from this machine's files (or, for a layered base, a local image).
enum OfflineImage {
    Base,
    Layered { from: String, tag: Option<String> },
    Dind,
}

async fn build_image(home: &Path, which: OfflineImage) -> Result<()> {
    crate::data_dir::prepare(home).map_err(|source| Error::Home {
        path: home.to_owned(),
        source,
    })?;
    let docker = crate::executor::docker::connect().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(progress) = rx.recv().await {
            if let crate::buildkit::BuildProgress::VertexCompleted { name, cached, .. } = progress {
                eprintln!("build: {name}{}", if cached { " (cached)" } else { "" });
            }
        }
    });
    let started = std::time::Instant::now();
    let endpoint = crate::buildkit::DockerEndpoint::from_env();
    let cancel = tokio_util::sync::CancellationToken::new();
    let inputs = crate::image::base::BaseImageInputs::from_env(home);
    let (what, image) = match which {
        OfflineImage::Layered { from, tag } => {
            // The shell probe runs a container: it is labelled with this process's id and held under a lease, so
            // the reaper of another runner leaves it alone and removes it should this process die.
            let app = App::open(home).await?;
            let owner = crate::image::layered::ProbeOwner {
                owner: uuid::Uuid::new_v4().to_string(),
                store: app.store.id().to_owned(),
            };
            app.store
                .renew_lease_for(
                    &owner.owner,
                    &crate::orchestrator::lease::hostname(),
                    std::process::id(),
                    crate::orchestrator::lease::LEASE_TTL * 10,
                )
                .await?;
            let request = crate::image::layered::LayeredRequest {
                from,
                tag,
                agent: inputs.agent.clone(),
            };
            let built = crate::image::layered::build_layered(
                home, &endpoint, &docker, &request, &owner, tx, cancel,
            )
            .await;
            app.store.drop_lease(&owner.owner).await?;
            ("base runner image", built?)
        }
        OfflineImage::Base => (
            "base runner image",
            crate::image::base::build_base(
                home,
                &endpoint,
                &docker,
                &inputs,
                &crate::runtime::base_image(),
                tx,
                cancel,
            )
            .await?,
        ),
        OfflineImage::Dind => (
            "Docker-in-Docker image",
            crate::image::dind::build_dind(
                home,
                &endpoint,
                &docker,
                &inputs.busybox,
                &crate::image::dind::reference(),
                tx,
                cancel,
            )
            .await?,
        ),
    };
    let _ = printer.await;
    let how = if image.built { "built" } else { "up to date" };
    eprintln!(
        "{what} {} {how} in {:.2} s",
        image.reference,
        started.elapsed().as_secs_f64()
    );
    println!("{}", image.image_id);
    Ok(())
}

async fn serve(
    home: &Path,
    policy: Option<&Path>,
    database: Option<&str>,
    args: ServeArgs,
) -> Result<()> {
    // Read as given: an empty or blank token is refused by the server's check, whatever its source.
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
                path: path.clone(),
                source,
            })?,
        ),
        None => std::env::var("RUNNER_TOKEN").ok(),
    };
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| Error::ReadFile {
            path: path.clone(),
            source,
        })
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::grpc::TlsIdentity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        }),
        _ => None,
    };
    let config = crate::grpc::ServerConfig {
        tls,
        token,
        grace: args.grace,
        ..Default::default()
    };
    // Refuse before anything is started or announced.
    config.check(args.listen).map_err(|e| match e {
        crate::grpc::ServerError::Token(e) => Error::Token(e),
        other => Error::Refused {
            message: crate::error::error_text(&other),
        },
    })?;
    // One set of metrics: the web view serves them, the gRPC server counts its calls into them.
    let metrics = args
        .http
        .map(|_| std::sync::Arc::new(crate::web::metrics::Metrics::new()));
    let config = crate::grpc::ServerConfig {
        calls: metrics.clone().map(|m| {
            crate::grpc::calls::CallCounter(std::sync::Arc::new(move |method: &str| {
                m.grpc_call(method)
            }))
        }),
        ..config
    };
    let web_config = crate::web::WebConfig {
        token: config.token.clone(),
        grace: args.grace,
        metrics,
    };
    if let Some(http) = args.http {
        web_config.check(http).map_err(|e| match e {
            crate::web::WebError::Token(e) => Error::Token(e),
            other => Error::Refused {
                message: crate::error::error_text(&other),
            },
        })?;
    }
    // No daemon needed to start: health says NOT_SERVING until one answers (and reaps then).
    let orchestrator = crate::runtime::serving(open_app(home, policy, database).await?)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Home {
            path: args.listen.to_string().into(),
            source,
        })?;
    let _retention = orchestrator
        .settings()
        .logs
        .retention
        .map(|age| crate::logs::retention::keep_pruning(orchestrator.app().store.clone(), age));
    let http = match args.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Home {
                    path: addr.to_string().into(),
                    source,
                })?,
        ),
        None => None,
    };
    // With JSON logs every stderr line is a JSON object: the announcements go through the log too.
    let json = args.log_format == "json";
    let announce = move |message: String| {
        if json {
            tracing::info!("{message}");
        } else {
            eprintln!("{message}");
        }
    };
    announce(format!("serving the runner API on {}", args.listen));
    let signals = crate::daemon::shutdown::signals().map_err(|source| Error::Home {
        path: "signal handlers".into(),
        source,
    })?;
    let grace = args.grace;
    let stopping = tokio_util::sync::CancellationToken::new();
    // The server's worker runs queued changes under the server's lease, which the API holds until the shutdown
    // below (which waits for the worker) has completed.
    let worker = (!args.no_worker).then(|| {
        let (orchestrator, stopping) = (orchestrator.clone(), stopping.clone());
        let settings = crate::orchestrator::worker::WorkerSettings {
            parallel: 4,
            poll: orchestrator.settings().poll,
            grace,
        };
        tokio::spawn(async move { orchestrator.work(&settings, stopping).await })
    });
    let shutdown = {
        let stopping = stopping.clone();
        async move {
            let signal = signals.await;
            announce(format!(
                "{signal}: no new changes; running changes get {} to finish, then are cancelled",
                crate::actions::format_duration(grace)
            ));
            stopping.cancel();
            if let Some(worker) = worker {
                let _ = worker.await;
            }
        }
    };
    let web = http.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            announce(format!("serving the web view on http://{addr}/"));
        }
        let stopping = stopping.clone();
        tokio::spawn(crate::web::run(
            listener,
            orchestrator.clone(),
            web_config,
            async move { stopping.cancelled().await },
        ))
    });
    // Until the API has stopped: changes that finish during the grace period are logged too.
    let log_stop = tokio_util::sync::CancellationToken::new();
    let event_log = tokio::spawn(crate::daemon::event_log::log_events(
        orchestrator.clone(),
        log_stop.clone(),
    ));
    let served = crate::grpc::run(listener, orchestrator, config, shutdown).await;
    // The web view and the event log stop with the API (a failed API stops them too).
    stopping.cancel();
    log_stop.cancel();
    let _ = event_log.await;
    let web = match web {
        Some(task) => match task.await {
            Ok(result) => result.map_err(|e| crate::error::error_text(&e)),
            Err(e) => Err(e.to_string()),
        },
        None => Ok(()),
    };
    served.map_err(|e| Error::Server {
        message: crate::error::error_text(&e),
    })?;
    web.map_err(|message| Error::Server { message })
}

/// `runner worker`: runs queued changes until a signal, under its own lease, logging what its changes do.
async fn worker(
    home: &Path,
    policy: Option<&Path>,
    database: Option<&str>,
    args: WorkerArgs,
) -> Result<()> {
    let orchestrator = crate::runtime::local(open_app(home, policy, database).await?).await?;
    let signals = crate::daemon::shutdown::signals().map_err(|source| Error::Home {
        path: "signal handlers".into(),
        source,
    })?;
    let stop_lease = tokio_util::sync::CancellationToken::new();
    let lease = orchestrator.hold_lease(stop_lease.clone()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let log_stop = tokio_util::sync::CancellationToken::new();
    let event_log = tokio::spawn(crate::daemon::event_log::log_events(
        orchestrator.clone(),
        log_stop.clone(),
    ));
    let grace = args.grace;
    let on_signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let signal = signals.await;
            eprintln!(
                "{signal}: no new changes; running changes get {} to finish, then are cancelled",
                crate::actions::format_duration(grace)
            );
            stop.cancel();
        })
    };
    eprintln!(
        "worker {} (pid {}): running the changes queued in the store",
        orchestrator.owner(),
        std::process::id()
    );
    let settings = crate::orchestrator::worker::WorkerSettings {
        parallel: args.parallel.into(),
        poll: orchestrator.settings().poll,
        grace,
    };
    let worked = orchestrator.work(&settings, stop).await;
    on_signal.abort();
    log_stop.cancel();
    let _ = event_log.await;
    // The lease goes last: until every change this worker ran has ended, it answers for them.
    stop_lease.cancel();
    let _ = lease.await;
    worked
}

/// `runner cache prune`: files first (no daemon needed), then images.
async fn prune(
    app: &crate::app::App,
    options: &crate::cache::prune::PruneOptions,
    out: Output,
) -> Result<()> {
    let mut used = crate::cache::prune::in_use(&app.store).await?;
    used.base_images.insert(crate::runtime::base_image());
    let mut pruned = crate::cache::prune::prune_files(&app.home, &used, options)?;
    let docker = crate::executor::docker::connect().await?;
    pruned.extend(crate::cache::prune::prune_images(&docker, &used, options).await?);
    pruned.extend(crate::cache::prune::prune_base_images(&docker, &used, options).await?);
    let total: u64 = pruned.iter().map(|p| p.bytes).sum();
    match out {
        Output::Json => println!(
            "{}",
            serde_json::json!({"dry_run": options.dry_run, "removed": pruned, "bytes": total})
        ),
        Output::Text => {
            let verb = if options.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for p in &pruned {
                println!("{verb} {} {} ({} bytes)", p.kind, p.what, p.bytes);
            }
            println!("{verb} {} items, {total} bytes", pruned.len());
        }
    }
    Ok(())
}

/// Reads a file, or stdin for `-`.
fn read_input(path: &Path) -> Result<String> {
    let read_error = |source| Error::ReadFile {
        path: path.to_owned(),
        source,
    };
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(read_error)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(read_error)
    }
}
