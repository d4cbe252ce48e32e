//! Private git remotes over real HTTPS and SSH servers on loopback: changes run from them with a granted credential,
//! every wrong credential or untrusted server is refused before anything runs, and the credential reaches nothing a
//! step, the store, the logs or the API shows.

#[path = "git_remotes/servers.rs"]
mod servers;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use servers::{https, repos, ssh, TOKEN};

/// A data directory whose operator trusts the test CA and the test sshd's host key, and grants `git-cred` to the
/// project `private`.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let home = Home {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(
            home.path().join("policy.toml"),
            "[[grant]]\nproject = \"private\"\nsecrets = [\"git-cred\"]\n",
        )
        .unwrap();
        std::fs::create_dir_all(home.path().join("git")).unwrap();
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn trust_ca(&self) -> &Home {
        std::fs::write(self.path().join("git/ca.pem"), &https().ca_pem).unwrap();
        self
    }

    fn trust_ssh_host(&self) -> &Home {
        std::fs::write(self.path().join("git/known_hosts"), ssh().known_hosts()).unwrap();
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
        cmd.args(args)
            .env("RUNNER_HOME", self.path())
            .env("RUNNER_STOP_GRACE", "2s")
            .env("RUNNER_GIT_TIMEOUT", "20s");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("runner runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "runner {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "runner {args:?} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The project `private` on `url` with credential `git-cred` holding `entries`, and its `dev` environment.
    fn project(&self, url: &str, entries: &[String]) -> &Home {
        let mut args = vec!["secret", "set", "git-cred"];
        args.extend(entries.iter().map(String::as_str));
        self.ok(&args);
        self.ok(&[
            "project",
            "create",
            "--code",
            "private",
            "--name",
            "Private",
            "--git-remote",
            url,
            "--git-credential",
            "git-cred",
        ]);
        self.ok(&[
            "environment",
            "create",
            "--project",
            "private",
            "--code",
            "dev",
            "--name",
            "Dev",
        ]);
        self
    }

    fn no_change_ran(&self) {
        let listed = self.ok(&["change", "list", "--output", "json"]);
        assert_eq!(listed.trim(), "[]", "a change was created: {listed}");
    }

    /// Every file of the data directory (store with its WAL, secrets excepted, mirrors, cached repo.tar files).
    fn files_outside_secrets(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut files = vec![];
        walk(self.path(), &mut files);
        files.retain(|f| !f.starts_with(self.path().join("secrets")));
        files
    }
}

fn token_entries() -> Vec<String> {
    vec![
        "GIT_USERNAME=git-user".to_owned(),
        format!("GIT_TOKEN={TOKEN}"),
    ]
}

fn key_entries(key: &str) -> Vec<String> {
    vec![format!("GIT_SSH_KEY={key}")]
}

/// A line from the middle of the test client's private key: what must never show anywhere.
fn key_canary() -> String {
    let key = &ssh().client_key;
    key.lines()
        .filter(|l| !l.starts_with("-----"))
        .nth(1)
        .expect("a multi-line key")
        .to_owned()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn assert_absent(what: &str, bytes: &[u8], canaries: &[&str]) {
    for canary in canaries {
        assert!(!contains(bytes, canary), "the credential reached {what}");
    }
}

/// The step image of the change's only step, as `docker save` bytes (every layer, uncompressed).
async fn image_bytes(image: &str) -> Vec<u8> {
    use futures::StreamExt;
    let docker = bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let mut stream = docker.export_image(image);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    bytes
}

/// The canaries are absent from every file of the data directory but the secrets, from repo.tar (whose `.git`
/// config names no credential), and from the step image.
async fn assert_nothing_leaked(home: &Home, change: &serde_json::Value, canaries: &[&str]) {
    let files = home.files_outside_secrets();
    assert!(files.iter().any(|f| f.ends_with("runner.db")), "{files:?}");
    let tars: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "tar"))
        .collect();
    assert!(!tars.is_empty(), "no repo.tar in {files:?}");
    for file in &files {
        assert_absent(
            &file.display().to_string(),
            &std::fs::read(file).unwrap(),
            canaries,
        );
    }
    for tar in tars {
        let unpacked = tempfile::tempdir().unwrap();
        tar::Archive::new(std::fs::File::open(tar).unwrap())
            .unpack(unpacked.path())
            .unwrap();
        let config = std::fs::read_to_string(unpacked.path().join(".git/config")).unwrap();
        assert!(!config.contains('@'), "{config}");
        let log = servers::git(unpacked.path(), &["log", "--format=%H"]);
        assert_eq!(log, repos().sha);
    }
    let image = change["steps"][0]["image_id"]
        .as_str()
        .expect("the step has an image")
        .to_owned();
    let bytes = image_bytes(&image).await;
    assert!(contains(&bytes, "opschain"), "the image export is empty");
    assert_absent(&format!("the step image {image}"), &bytes, canaries);
}

fn change_json(home: &Home) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(&home.ok(&["change", "list", "--output", "json"])).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    serde_json::from_str(&home.ok(&["change", "show", &id, "--output", "json"])).unwrap()
}

const CREATE: [&str; 10] = [
    "change",
    "create",
    "--project",
    "private",
    "--environment",
    "dev",
    "--git-rev",
    "main",
    "--action",
    "show",
];

/// `runner serve` on a free loopback port with a token, stopped on drop.
struct Server {
    child: std::process::Child,
    url: String,
    token_file: tempfile::NamedTempFile,
}

impl Server {
    fn start(home: &Home) -> Server {
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), "api-token-1").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = home
            .command(&[
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token-file",
                token_file.path().to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "runner serve did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            token_file,
        }
    }

    /// A CLI call through the server; returns (success, stdout + stderr).
    fn call(&self, home: &Home, args: &[&str]) -> (bool, String) {
        let _ = &self.token_file;
        let mut all = vec!["--server", &self.url, "--token", "api-token-1"];
        all.extend_from_slice(args);
        let out = home.run(&all);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_runs_from_a_private_https_remote_and_the_token_reaches_nothing_shown() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    let home = Home::new();
    home.trust_ca().project(&https().url(), &token_entries());
    let server = Server::start(&home);
    let (ok, created) = server.call(&home, &CREATE);
    assert!(ok, "{created}");
    assert!(created.contains("step ran at"), "{created}");
    // The step's own view of /opt/opschain/.git/config: no remote, so no credential to leak.
    assert!(
        created.contains("[core]") && !created.contains("[remote"),
        "{created}"
    );
    // The server saw the token: the remote really is private.
    assert!(https()
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains("auth=Basic ")));
    let change = change_json(&home);
    assert_eq!(change["change"]["git_sha"], repos().sha.as_str());
    let id = change["change"]["id"].as_str().unwrap().to_owned();
    let step = change["steps"][0]["id"].as_str().unwrap().to_owned();
    let mut answers = created;
    for args in [
        vec!["project", "list", "--output", "json"],
        vec![
            "project",
            "fetch",
            "--project",
            "private",
            "--output",
            "json",
        ],
        vec!["change", "list", "--output", "json"],
        vec!["change", "show", &id, "--output", "json"],
        vec!["change", "show-logs", &id],
        vec!["step", "show", &step, "--output", "json"],
    ] {
        let (ok, answer) = server.call(&home, &args);
        assert!(ok, "{args:?}: {answer}");
        answers.push_str(&answer);
    }
    assert!(
        answers.contains("\"git_credential\": \"git-cred\""),
        "{answers}"
    );
    assert_absent("an API response", answers.as_bytes(), &[TOKEN]);
    drop(server);
    assert_nothing_leaked(&home, &change, &[TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_run_from_ssh_remotes_in_scp_and_url_form_and_the_key_reaches_nothing_shown() {
    if !support::docker_available() {
        return;
    }
    support::base_image();
    for url in [ssh().scp_url(), ssh().ssh_url()] {
        let home = Home::new();
        home.trust_ssh_host()
            .project(&url, &key_entries(&ssh().client_key));
        let out = home.run(&CREATE);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{url}: {stdout}\n{stderr}");
        assert!(stdout.contains("step ran at"), "{stdout}");
        let change = change_json(&home);
        assert_eq!(change["change"]["git_sha"], repos().sha.as_str());
        let id = change["change"]["id"].as_str().unwrap().to_owned();
        let logs = home.ok(&["change", "show-logs", &id]);
        let shown = home.ok(&["project", "list", "--output", "json"]);
        let canary = key_canary();
        assert_absent(
            "the CLI's output",
            format!("{stdout}{stderr}{logs}{shown}").as_bytes(),
            &[&canary],
        );
        assert_nothing_leaked(&home, &change, &[&canary]).await;
    }
}

#[test]
fn a_wrong_token_is_refused_naming_the_secret_and_nothing_runs() {
    let home = Home::new();
    home.trust_ca().project(
        &https().url(),
        &[
            "GIT_USERNAME=git-user".to_owned(),
            "GIT_TOKEN=wrong-token".to_owned(),
        ],
    );
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("over HTTPS"), "{error}");
    assert!(error.contains("authentication"), "{error}");
    assert!(error.contains("\"git-cred\""), "{error}");
    assert!(!error.contains("wrong-token"), "{error}");
    if support::docker_available() {
        let error = home.fails(&CREATE);
        assert!(error.contains("authentication"), "{error}");
        home.no_change_ran();
    }
}

#[test]
fn a_private_https_remote_without_a_credential_says_to_set_one() {
    let home = Home::new();
    home.trust_ca();
    home.ok(&[
        "project",
        "create",
        "--code",
        "private",
        "--name",
        "P",
        "--git-remote",
        &https().url(),
    ]);
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("asks for credentials"), "{error}");
    assert!(error.contains("--credential"), "{error}");
}

#[test]
fn a_wrong_ssh_key_is_refused() {
    let home = Home::new();
    home.trust_ssh_host()
        .project(&ssh().ssh_url(), &key_entries(&ssh().stranger_key));
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("over SSH"), "{error}");
    assert!(error.contains("authentication"), "{error}");
    assert!(error.contains("GIT_SSH_KEY"), "{error}");
}

#[test]
fn an_unknown_ssh_host_key_is_refused_naming_its_fingerprint() {
    let home = Home::new();
    // The operator's known_hosts knows another host only.
    std::fs::write(
        home.path().join("git/known_hosts"),
        format!("git.example.com {}\n", ssh().host_key),
    )
    .unwrap();
    home.project(&ssh().scp_url(), &key_entries(&ssh().client_key));
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    let blob = ssh().host_key.split_whitespace().nth(1).unwrap();
    let fingerprint = runner::snapshot::remote::fingerprint(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, blob).unwrap(),
    );
    assert!(error.contains("host key"), "{error}");
    assert!(error.contains(&fingerprint), "{error}");
    assert!(error.contains("known_hosts"), "{error}");
    // A changed key is refused too, and called what it is.
    std::fs::write(
        home.path().join("git/known_hosts"),
        format!(
            "{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKTbZW5UYBedQn62YMpFdxpnJPd6TLfr0jMCo4f/VV7Y\n",
            ssh().scp_host
        ),
    )
    .unwrap();
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("is not the key"), "{error}");
    assert!(error.contains(&fingerprint), "{error}");
}

#[test]
fn an_untrusted_tls_certificate_is_refused_and_the_ca_bundle_fixes_it() {
    let home = Home::new();
    home.project(&https().url(), &token_entries());
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("TLS"), "{error}");
    assert!(error.contains("ca.pem"), "{error}");
    home.trust_ca();
    let fetched = home.ok(&["project", "fetch", "--project", "private"]);
    assert!(fetched.contains("fetched"), "{fetched}");
    // Fetching again is incremental: the mirror is kept and still resolves the commit.
    let again = home.ok(&[
        "project",
        "fetch",
        "--project",
        "private",
        "--output",
        "json",
    ]);
    assert!(again.contains("\"refs\": 1"), "{again}");
}

#[test]
fn a_url_with_credentials_in_it_is_refused_and_never_stored() {
    let home = Home::new();
    for url in [
        "https://git-user:tok-in-url-123@127.0.0.1/private.git".to_owned(),
        "https://tok-in-url-123@127.0.0.1/private.git".to_owned(),
        "ssh://git:tok-in-url-123@127.0.0.1/private.git".to_owned(),
    ] {
        let error = home.fails(&[
            "project",
            "create",
            "--code",
            "leaky",
            "--name",
            "L",
            "--git-remote",
            &url,
        ]);
        assert!(error.contains("credential secret"), "{error}");
        assert!(!error.contains("tok-in-url-123"), "{error}");
    }
    home.ok(&["project", "create", "--code", "leaky", "--name", "L"]);
    let error = home.fails(&[
        "project",
        "set-git-remote",
        "--project",
        "leaky",
        "--url",
        "https://u:tok-in-url-123@127.0.0.1/r.git",
    ]);
    assert!(error.contains("credential secret"), "{error}");
    for file in home.files_outside_secrets() {
        assert_absent(
            &file.display().to_string(),
            &std::fs::read(&file).unwrap(),
            &["tok-in-url-123"],
        );
    }
}

#[test]
fn a_credential_the_operator_did_not_grant_is_refused() {
    let home = Home::new();
    home.trust_ca();
    home.ok(&["secret", "set", "other-cred", &format!("GIT_TOKEN={TOKEN}")]);
    home.ok(&[
        "project",
        "create",
        "--code",
        "private",
        "--name",
        "P",
        "--git-remote",
        &https().url(),
        "--git-credential",
        "other-cred",
    ]);
    let error = home.fails(&["project", "fetch", "--project", "private"]);
    assert!(error.contains("not granted"), "{error}");
    assert!(error.contains("policy.toml"), "{error}");
}

#[test]
fn a_server_that_never_answers_fails_the_fetch_within_the_timeout() {
    let home = Home::new();
    home.ok(&[
        "project",
        "create",
        "--code",
        "hang",
        "--name",
        "H",
        "--git-remote",
        &format!("https://127.0.0.1:{}/r.git", servers::silent_port()),
    ]);
    let start = Instant::now();
    let out = home
        .command(&["project", "fetch", "--project", "hang"])
        .env("RUNNER_GIT_TIMEOUT", "2s")
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(error.contains("network"), "{error}");
    assert!(
        error.contains("RUNNER_GIT_TIMEOUT") || error.contains("reachable"),
        "{error}"
    );
}

#[tokio::test]
async fn dropping_a_fetch_stops_waiting_at_once() {
    let home = Home::new();
    let app = runner::app::App::open(home.path()).await.unwrap();
    let project = app
        .create_project(
            "hang",
            "H",
            Some(&format!(
                "https://127.0.0.1:{}/r.git",
                servers::silent_port()
            )),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let fetch =
        runner::snapshot::fetch_mirror(home.path(), &app.policy, &project, Duration::from_secs(5));
    assert!(tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .is_err());
    assert!(start.elapsed() < Duration::from_secs(3));
}
