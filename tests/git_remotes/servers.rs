//! Real git servers on loopback, started once per test binary: `git http-backend` behind a small HTTPS server
//! (a CA made here, basic auth), and Debian's OpenSSH `sshd` with its own config, host key and an authorised test
//! key. Both serve the same bare repositories; both stop when the test process exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;

/// The repositories both servers serve, under a directory that lives as long as the test process.
pub struct Repos {
    pub root: PathBuf,
    /// `private.git`: a bare repository with a `.opschain/actions.json`.
    pub private: PathBuf,
    pub sha: String,
}

/// The repositories, made once.
pub fn repos() -> &'static Repos {
    static REPOS: OnceLock<Repos> = OnceLock::new();
    REPOS.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let work = root.join("work");
        std::fs::create_dir_all(work.join(".opschain")).unwrap();
        std::fs::write(
            work.join(".opschain/actions.json"),
            serde_json::json!({"actions": {
                "show": {"run": "echo step ran at $(cat /opt/opschain/.git/HEAD); cat /opt/opschain/.git/config"}
            }})
            .to_string(),
        )
        .unwrap();
        std::fs::write(work.join("README"), "a private repository\n").unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "private project"]);
        let private = root.join("private.git");
        git(
            &root,
            &["clone", "-q", "--bare", work.to_str().unwrap(), private.to_str().unwrap()],
        );
        let sha = git(&work, &["rev-parse", "HEAD"]);
        Repos { root, private, sha }
    })
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Processes to stop when the test binary exits.
static CHILDREN: Mutex<Vec<std::process::Child>> = Mutex::new(Vec::new());

extern "C" fn stop_children() {
    if let Ok(mut children) = CHILDREN.lock() {
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn register_child(child: std::process::Child) {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        // SAFETY: registers a plain function run at process exit.
        unsafe { libc::atexit(stop_children) };
    });
    CHILDREN.lock().unwrap().push(child);
}

fn wait_for_port(addr: &str) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing listens on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// HTTPS

pub struct HttpsGit {
    pub port: u16,
    /// The CA that signed the server's certificate (PEM); the system roots do not know it.
    pub ca_pem: String,
    pub user: String,
    pub token: String,
    /// Every request line and `Authorization` header the server saw, to show what a client sent.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl HttpsGit {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/private.git", self.port)
    }
}

pub const TOKEN: &str = "tok-canary-5e1f9b7d3c";

/// The HTTPS git server, started once: basic auth `git-user` / [`TOKEN`].
pub fn https() -> &'static HttpsGit {
    static SERVER: OnceLock<HttpsGit> = OnceLock::new();
    SERVER.get_or_init(|| {
        let repos = repos();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "runner test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
        let mut acceptor =
            openssl::ssl::SslAcceptor::mozilla_intermediate_v5(openssl::ssl::SslMethod::tls())
                .unwrap();
        acceptor
            .set_certificate(&openssl::x509::X509::from_pem(cert.pem().as_bytes()).unwrap())
            .unwrap();
        acceptor
            .set_private_key(
                &openssl::pkey::PKey::private_key_from_pem(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server = HttpsGit {
            port,
            ca_pem: ca.pem(),
            user: "git-user".into(),
            token: TOKEN.into(),
            seen: seen.clone(),
        };
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", server.user, server.token))
        );
        let root = repos.root.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (acceptor, expected, root, seen) = (
                    acceptor.clone(),
                    expected.clone(),
                    root.clone(),
                    seen.clone(),
                );
                std::thread::spawn(move || {
                    if let Ok(mut tls) = acceptor.accept(stream) {
                        let _ = serve_http(&mut tls, &expected, &root, &seen);
                    }
                });
            }
        });
        server
    })
}

/// One request, answered by `git http-backend` (CGI), then the connection closes.
fn serve_http(
    stream: &mut (impl Read + Write),
    expected_auth: &str,
    root: &Path,
    seen: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut *stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(length) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    drop(reader);
    let auth = header("authorization");
    seen.lock().unwrap().push(format!(
        "{} auth={}",
        request_line.trim(),
        auth.clone().unwrap_or_default()
    ));
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("GET"), parts.next().unwrap_or("/"));
    if auth.as_deref() != Some(expected_auth) {
        let body = b"authentication required\n";
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        stream.write_all(body)?;
        return stream.flush();
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut cgi = Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "git-user")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    cgi.stdin.take().unwrap().write_all(&body)?;
    let output = cgi.wait_with_output()?;
    let split = output
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| {
            output
                .stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
        });
    let (head, content) = match split {
        Some((p, n)) => (
            String::from_utf8_lossy(&output.stdout[..p]).into_owned(),
            &output.stdout[p + n..],
        ),
        None => (String::new(), &output.stdout[..]),
    };
    let mut status = "200 OK".to_owned();
    let mut response_headers = String::new();
    for line in head.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_owned()
            }
            Some(_) => response_headers.push_str(&format!("{}\r\n", line.trim_end())),
            None => {}
        }
    }
    write!(
        stream,
        "HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        content.len()
    )?;
    stream.write_all(content)?;
    stream.flush()
}

/// A TCP listener that accepts and never answers: a server that hangs.
pub fn silent_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        port
    })
}

// ---------------------------------------------------------------------------------------------------------------
// SSH

pub struct SshGit {
    /// sshd's port on 127.0.0.1, for `ssh://` URLs.
    pub port: u16,
    /// A loopback address where sshd also listens on port 22, for scp-style `user@host:path` URLs (no port).
    pub scp_host: String,
    pub user: String,
    /// The server's host key, as a `known_hosts` key field (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// The authorised client key (OpenSSH private key).
    pub client_key: String,
    /// A key the server does not know.
    pub stranger_key: String,
}

impl SshGit {
    pub fn ssh_url(&self) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            repos().private.display()
        )
    }
    pub fn scp_url(&self) -> String {
        format!(
            "{}@{}:{}",
            self.user,
            self.scp_host,
            repos().private.display()
        )
    }
    /// The operator's `known_hosts` lines for both addresses.
    pub fn known_hosts(&self) -> String {
        format!(
            "[127.0.0.1]:{} {}\n{} {}\n",
            self.port, self.host_key, self.scp_host, self.host_key
        )
    }
}

fn keygen(path: &Path) -> (String, String) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "runner-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs (openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let private = std::fs::read_to_string(path).unwrap();
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (private, public.trim().to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// sshd, started once: listens on 127.0.0.1:<port> and <scp_host>:22, public keys only.
pub fn ssh() -> &'static SshGit {
    static SERVER: OnceLock<SshGit> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let (_, host_public) = keygen(&dir.join("host_key"));
        let (client_key, client_public) = keygen(&dir.join("client_key"));
        let (stranger_key, _) = keygen(&dir.join("stranger_key"));
        std::fs::write(dir.join("authorized_keys"), format!("{client_public}\n")).unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        let port = free_port();
        let pid = std::process::id();
        let scp_host = format!("127.22.{}.{}", (pid >> 8) & 0xff, (pid & 0xff).max(1));
        // Privilege separation wants this directory (absent where sshd was never started as a service).
        if std::fs::create_dir_all("/run/sshd").is_err() {
            eprintln!("cannot create /run/sshd; sshd may refuse to start");
        }
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\nListenAddress {scp_host}:22\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
                 PidFile none\nAllowUsers {user}\nLogLevel VERBOSE\n\
",
                dir = dir.display()
            ),
        )
        .unwrap();
        let sshd = "/usr/sbin/sshd";
        let check = Command::new(sshd).arg("-t").arg("-f").arg(&config).output().expect(
            "sshd runs: install Debian's openssh-server (tools/setup.sh does)",
        );
        assert!(check.status.success(), "sshd -t: {}", String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        register_child(child);
        wait_for_port(&format!("127.0.0.1:{port}"));
        wait_for_port(&format!("{scp_host}:22"));
        let host_key = host_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        SshGit {
            port,
            scp_host,
            user,
            host_key,
            client_key,
            stranger_key,
        }
    })
}
