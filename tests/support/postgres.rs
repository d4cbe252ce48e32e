//! A throwaway PostgreSQL cluster of Debian's packages for the tests: `initdb` as the `postgres` user into a
//! private directory, a server listening on a free loopback port and a private socket directory, one fresh
//! database per test, and everything stopped and removed when the last test of the process that uses it is done.
//! A machine without PostgreSQL fails these tests, unless `RUNNER_TEST_SKIP_POSTGRES=1` says to skip them loudly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The variable that lets a machine without PostgreSQL run the rest of the suite.
pub const SKIP_POSTGRES: &str = "RUNNER_TEST_SKIP_POSTGRES";

/// A running cluster; stopped and deleted on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    databases: AtomicUsize,
}

/// The directory holding Debian's `initdb` and `pg_ctl` (newest version), if PostgreSQL is installed.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// Whether the PostgreSQL tests may run; panics when PostgreSQL is missing unless the opt-out is set, in which
/// case the skip is said on the real stderr and `false` returned.
pub fn postgres_available() -> bool {
    if bin_dir().is_some() {
        return true;
    }
    if std::env::var(SKIP_POSTGRES).ok().as_deref() != Some("1") {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): install Debian's postgresql \
             (bash tools/setup.sh does), or set {SKIP_POSTGRES}=1 to skip the tests that need it"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a PostgreSQL test")
        .to_owned();
    let line =
        format!("\n*** SKIPPED {test}: PostgreSQL is not installed and {SKIP_POSTGRES}=1 ***\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The cluster the tests of this process share, started on first use, stopped and removed when the process exits.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        extern "C" fn stop_shared() {
            if let Some(cluster) = SHARED.get() {
                cluster.stop();
            }
        }
        let cluster = Cluster::start();
        // SAFETY: registers a plain function without arguments to run at exit (the test harness exits normally).
        unsafe { libc::atexit(stop_shared) };
        cluster
    })
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Cluster {
    /// initdb + pg_ctl start, as the `postgres` user.
    pub fn start() -> Cluster {
        let bin = bin_dir().expect("PostgreSQL is installed (postgres_available() says so first)");
        let dir = tempfile::Builder::new()
            .prefix("runner-pg-")
            .tempdir()
            .expect("a temporary directory");
        run(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()),
            "chown of the cluster directory",
        );
        let data = dir.path().join("data");
        run(
            as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]),
            "initdb",
        );
        // A port another process takes between our probe and the server's bind makes pg_ctl fail: try again.
        for attempt in 0.. {
            let port = free_port();
            let options = format!(
                "-k {} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c max_connections=200",
                dir.path().display()
            );
            let status = as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(dir.path().join("server.log"))
                .arg("start")
                .stdout(std::process::Stdio::null())
                .status()
                .expect("pg_ctl runs");
            if status.success() {
                return Cluster {
                    dir,
                    bin,
                    port,
                    databases: AtomicUsize::new(0),
                };
            }
            if attempt == 3 {
                let log =
                    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!("pg_ctl start failed 4 times:\n{log}");
            }
        }
        unreachable!()
    }

    /// A new empty database on this cluster; its URL.
    pub fn database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("runner_test_{}_{n}", std::process::id());
        run(
            as_postgres(&self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .arg(&name),
            "createdb",
        );
        self.url(&name)
    }

    /// The URL of database `name` over the cluster's unix socket: reachable from a process in a network namespace
    /// of its own (a "host" with no network), as long as it sees this machine's files.
    pub fn socket_url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost/{name}?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Cluster {
    /// Stops the server at once and deletes its files.
    pub fn stop(&self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
