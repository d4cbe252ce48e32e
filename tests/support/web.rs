//! Helpers of the web view's tests: a real `runner serve --http` over a demo data directory, plain HTTP/1.1
//! requests (so a test controls every header: cookies, Origin, Host), and chromedriver for the browser tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::Demo;

pub const TOKEN: &str = "web-test-token-0123456789";
pub const SKIP_BROWSER: &str = "RUNNER_TEST_SKIP_BROWSER";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request to `127.0.0.1:port`; `headers` as given (a `Host` among them replaces the default).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the web server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `runner serve` with its web view on a demo data directory; stopped (SIGTERM, then waited for) on drop.
pub struct Server {
    pub demo: Demo,
    pub grpc: u16,
    pub http: u16,
    pub token: Option<String>,
    child: Child,
}

impl Server {
    pub fn start(token: Option<&str>) -> Server {
        Server::start_on(Demo::new(), token)
    }

    pub fn start_on(demo: Demo, token: Option<&str>) -> Server {
        let (grpc, http) = (free_port(), free_port());
        let mut cmd = demo.command(&[
            "serve",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--grace",
            "2s",
        ]);
        if let Some(token) = token {
            let file = demo.home.path().join("token");
            std::fs::write(&file, token).unwrap();
            cmd.arg("--token-file").arg(&file);
        }
        // The server's own log stays with its data directory (serve.log), out of the test output.
        let log = std::fs::File::create(demo.home.path().join("serve.log")).unwrap();
        cmd.env_remove("RUNNER_TOKEN")
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("runner serve starts");
        let server = Server {
            demo,
            grpc,
            http,
            token: token.map(str::to_owned),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", http)).is_ok()
                && request(http, "GET", "/readyz", &[], "").status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "runner serve did not get ready on port {http}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// A `runner --server … change create --background` on `env`; returns the change id.
    pub fn create(&self, env: &str, action: &str) -> String {
        let mut args = vec![
            "--server".to_owned(),
            format!("http://127.0.0.1:{}", self.grpc),
        ];
        if let Some(token) = &self.token {
            args.extend(["--token".to_owned(), token.clone()]);
        }
        args.extend(
            super::support::create_args(env, action, &["--background"])
                .into_iter()
                .map(str::to_owned),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.demo.ok(&args).trim().to_owned()
    }

    /// The change as `runner change show --output json` says, from the data directory.
    pub fn show(&self, id: &str) -> serde_json::Value {
        self.demo.json(&["change", "show", id])
    }

    /// Waits until the change is in a final state; returns it.
    pub fn wait_final(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let shown = self.show(id);
            let state = shown["change"]["state"]
                .as_str()
                .or_else(|| shown["state"].as_str())
                .unwrap_or("")
                .to_owned();
            if ["success", "error", "cancelled"].contains(&state.as_str()) {
                return shown;
            }
            assert!(Instant::now() < deadline, "change {id} still {state}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Logs in with the token; returns the session cookie (`runner_session=…`).
    pub fn login(&self) -> String {
        let body = format!(
            "token={}&next=%2Fchanges",
            self.token.as_deref().unwrap_or("")
        );
        let answer = request(self.http, "POST", "/login", &[], &body);
        assert_eq!(answer.status, 303, "{answer:?}");
        let cookie = answer.header("set-cookie").expect("a session cookie");
        cookie.split(';').next().unwrap().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the browser tests may run: chromedriver and chromium are installed. Missing ones fail the calling test
/// unless `RUNNER_TEST_SKIP_BROWSER=1`; then the skip is said on the real stderr.
pub fn browser_available() -> bool {
    let found = |name: &str| {
        Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("chromedriver") && found("chromium") {
        return true;
    }
    if std::env::var(SKIP_BROWSER).ok().as_deref() != Some("1") {
        panic!(
            "chromium and chromedriver are needed for the browser tests: install Debian's chromium and \
             chromium-driver (bash tools/setup.sh does), or set {SKIP_BROWSER}=1 to skip them"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a browser test")
        .to_owned();
    let line = format!("\n*** SKIPPED {test}: no chromium/chromedriver and {SKIP_BROWSER}=1 ***\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// A chromedriver process on a free port; killed on drop.
pub struct Driver {
    pub port: u16,
    child: Child,
}

impl Driver {
    pub fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { port, child }
    }

    /// A headless Chromium session at `width`×`height`.
    pub async fn client(&self, width: u32, height: u32) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         format!("--window-size={width},{height}")]
            }),
        );
        fantoccini::ClientBuilder::native()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromedriver session")
    }
}

impl Drop for Driver {
    /// Asks chromedriver to end its sessions and quit (their browsers with them, even those a failed test never
    /// closed); kills it only if it does not.
    fn drop(&mut self) {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.write_all(
                b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the test run writes its screenshots.
pub fn screenshot_dir() -> std::path::PathBuf {
    let dir = super::support::workspace_root().join("target/web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
