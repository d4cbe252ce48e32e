//! How a mirror reaches its remote: the URL forms git understands (local paths, `file://`, `https://`, `ssh://`,
//! scp-style `user@host:path`), the credential the operator granted a project, the trust anchors the operator
//! provides (`$RUNNER_HOME/git/known_hosts`, an extra CA bundle `$RUNNER_HOME/git/ca.pem`), and what a fetch
//! failure tells the user to check. Credentials never appear in a URL, a message or a `Debug` output.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use sha2::Digest;

use crate::secrets::SecretValues;

/// How git talks to a remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Local,
    Https,
    Http,
    Ssh,
    Git,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Local => "local",
            Transport::Https => "HTTPS",
            Transport::Http => "HTTP",
            Transport::Ssh => "SSH",
            Transport::Git => "git",
        })
    }
}

/// A remote URL taken apart as far as trust and credentials need: transport, host, port and (SSH) user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub transport: Transport,
    pub host: String,
    pub port: Option<u16>,
    pub user: Option<String>,
}

impl RemoteUrl {
    /// The host as `known_hosts` names it: `host`, or `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(port) if port != 22 => format!("[{}]:{port}", self.host),
            _ => self.host.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("the git remote {shown} carries credentials in the URL: remove them and hold them in a credential secret instead (`runner secret set NAME GIT_USERNAME=… GIT_TOKEN=…`, then `runner project set-git-remote --project P --url URL --credential NAME`)")]
    EmbeddedCredentials { shown: String },
    #[error("the git remote {url:?} is not understood: {reason}; use https://host/path, ssh://[user@]host[:port]/path, user@host:path or a local path")]
    Unsupported { url: String, reason: String },
    #[error(
        "credential secret {secret:?} cannot be used with the {transport} remote {url}: {reason}"
    )]
    CredentialUnusable {
        secret: String,
        transport: Transport,
        url: String,
        reason: String,
    },
    #[error("credential secret {secret:?} {problem}: for HTTPS set GIT_TOKEN (or GIT_PASSWORD) and optionally GIT_USERNAME; for SSH set GIT_SSH_KEY (the private key) and optionally GIT_SSH_PASSPHRASE")]
    CredentialIncomplete { secret: String, problem: String },
    #[error("credential secret {secret:?} is not granted to project {project:?}: the operator grants it in {policy} with a [[grant]] for project = \"{project}\" (without an environment: every environment shares the project's mirror) listing secrets = [\"{secret}\"]")]
    CredentialNotGranted {
        secret: String,
        project: String,
        policy: String,
    },
    #[error("the operator's CA bundle {path} cannot be used: {message}")]
    CaBundle { path: PathBuf, message: String },
}

/// Whether `url` is an scp-style SSH address (`[user@]host:path`): a colon with no slash before it, as git decides.
fn scp_like(url: &str) -> Option<(&str, &str)> {
    let colon = url.find(':')?;
    if url[..colon].contains('/') || colon == 0 {
        return None;
    }
    Some((&url[..colon], &url[colon + 1..]))
}

/// Takes a remote apart; refuses one with a password or token in it (they would reach the store, the API and every
/// log line that names the remote).
pub fn parse_url(url: &str) -> Result<RemoteUrl, RemoteError> {
    let unsupported = |reason: &str| RemoteError::Unsupported {
        url: redact(url),
        reason: reason.to_owned(),
    };
    let embedded = || RemoteError::EmbeddedCredentials { shown: redact(url) };
    let url = url.trim();
    if url.is_empty() {
        return Err(unsupported("it is empty"));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                return Ok(RemoteUrl {
                    transport: Transport::Local,
                    host: String::new(),
                    port: None,
                    user: None,
                })
            }
            "https" => Transport::Https,
            "http" => Transport::Http,
            "ssh" | "git+ssh" | "ssh+git" => Transport::Ssh,
            "git" => Transport::Git,
            other => {
                return Err(unsupported(&format!(
                    "the scheme {other:?} is not supported"
                )))
            }
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let user = match userinfo {
            // A user name is harmless over SSH (`git@`); anything after a colon is a password.
            Some(info) if transport == Transport::Ssh && !info.contains(':') => {
                Some(info.to_owned())
            }
            Some(_) => return Err(embedded()),
            None => None,
        };
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| unsupported("its host or port is malformed"))?;
        if host.is_empty() {
            return Err(unsupported("it names no host"));
        }
        return Ok(RemoteUrl {
            transport,
            host,
            port,
            user,
        });
    }
    // `user:password@host:path`: the first colon is inside the user information.
    if let Some(at) = url.find('@') {
        if url[..at].contains(':') && !url[..at].contains('/') {
            return Err(embedded());
        }
    }
    if let Some((login, _path)) = scp_like(url) {
        let (user, host) = match login.rsplit_once('@') {
            Some((user, _)) if user.contains(':') => return Err(embedded()),
            Some((user, host)) => (Some(user.to_owned()), host),
            None => (None, login),
        };
        if host.is_empty() {
            return Err(unsupported("it names no host"));
        }
        return Ok(RemoteUrl {
            transport: Transport::Ssh,
            host: host.trim_matches(['[', ']']).to_owned(),
            port: None,
            user,
        });
    }
    Ok(RemoteUrl {
        transport: Transport::Local,
        host: String::new(),
        port: None,
        user: None,
    })
}

fn split_host_port(hostport: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), Some(port.parse().ok()?))),
        None => Some((hostport.to_owned(), None)),
    }
}

/// `url` with any user information replaced by `***`, safe to show.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            return format!("{scheme}://***@{}", &rest[at + 1..]);
        }
        return url.to_owned();
    }
    if let Some((login, path)) = scp_like(url) {
        if let Some((user, host)) = login.rsplit_once('@') {
            if user.contains(':') {
                return format!("***@{host}:{path}");
            }
        }
    }
    // `user:password@host:path` has its first colon inside the user information.
    if let Some(at) = url.find('@') {
        if url[..at].contains(':') && !url[..at].contains('/') {
            return format!("***@{}", &url[at + 1..]);
        }
    }
    url.to_owned()
}

/// What a credential secret holds, by transport. `Debug` never shows a value.
#[derive(Clone)]
pub enum Credential {
    /// HTTPS basic authentication: a user name and a token or password.
    UserPassword { username: String, password: String },
    /// SSH public-key authentication with an in-memory private key.
    SshKey {
        username: Option<String>,
        private_key: String,
        passphrase: Option<String>,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::UserPassword { username, .. } => f
                .debug_struct("UserPassword")
                .field("username", username)
                .finish_non_exhaustive(),
            Credential::SshKey { username, .. } => f
                .debug_struct("SshKey")
                .field("username", username)
                .finish_non_exhaustive(),
        }
    }
}

fn value(values: &SecretValues, key: &str) -> Option<String> {
    values.0.get(key).filter(|v| !v.is_empty()).cloned()
}

impl Credential {
    /// The credential in secret `name` for a remote of `transport`: `GIT_USERNAME` (optional, default `git`) with
    /// `GIT_TOKEN` or `GIT_PASSWORD` for HTTPS; `GIT_SSH_KEY` with optional `GIT_SSH_PASSPHRASE` (and
    /// `GIT_USERNAME`, else the URL's user, else `git`) for SSH.
    pub fn from_secret(
        name: &str,
        values: &SecretValues,
        url: &str,
        remote: &RemoteUrl,
    ) -> Result<Credential, RemoteError> {
        let unusable = |reason: &str| RemoteError::CredentialUnusable {
            secret: name.to_owned(),
            transport: remote.transport,
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let incomplete = |problem: &str| RemoteError::CredentialIncomplete {
            secret: name.to_owned(),
            problem: problem.to_owned(),
        };
        match remote.transport {
            Transport::Https => {
                let password = value(values, "GIT_TOKEN")
                    .or_else(|| value(values, "GIT_PASSWORD"))
                    .ok_or_else(|| {
                        incomplete("has no GIT_TOKEN or GIT_PASSWORD for an HTTPS remote")
                    })?;
                Ok(Credential::UserPassword {
                    username: value(values, "GIT_USERNAME").unwrap_or_else(|| "git".into()),
                    password,
                })
            }
            Transport::Ssh => {
                let private_key = value(values, "GIT_SSH_KEY")
                    .ok_or_else(|| incomplete("has no GIT_SSH_KEY for an SSH remote"))?;
                if !private_key.contains("PRIVATE KEY-----") {
                    return Err(incomplete(
                        "has a GIT_SSH_KEY that is not a PEM or OpenSSH private key (`-----BEGIN … PRIVATE KEY-----`)",
                    ));
                }
                Ok(Credential::SshKey {
                    username: value(values, "GIT_USERNAME"),
                    private_key,
                    passphrase: value(values, "GIT_SSH_PASSPHRASE"),
                })
            }
            Transport::Http => Err(unusable(
                "plain HTTP would send it unencrypted; use the https:// URL of the repository",
            )),
            Transport::Local | Transport::Git => Err(unusable(
                "this transport takes no credential; remove it with `--credential ''`",
            )),
        }
    }

    /// The secret values, for masking them out of anything shown.
    pub fn values(&self) -> Vec<&str> {
        match self {
            Credential::UserPassword { password, .. } => vec![password],
            Credential::SshKey {
                private_key,
                passphrase,
                ..
            } => std::iter::once(private_key.as_str())
                .chain(passphrase.as_deref())
                .collect(),
        }
    }
}

/// The trust anchors the operator provides, under `<home>/git/`.
#[derive(Debug, Clone)]
pub struct Trust {
    /// SSH host keys, OpenSSH `known_hosts` format. A host not in it is refused.
    pub known_hosts: PathBuf,
    /// Extra CA certificates (PEM) trusted for HTTPS on top of the system roots; ignored when absent.
    pub ca_bundle: PathBuf,
}

impl Trust {
    pub fn in_home(home: &Path) -> Trust {
        Trust {
            known_hosts: home.join("git").join("known_hosts"),
            ca_bundle: home.join("git").join("ca.pem"),
        }
    }
}

/// Everything a fetch needs besides the URL.
#[derive(Debug, Clone)]
pub struct RemoteAccess {
    /// The granted credential and the name of the secret it came from.
    pub credential: Option<(String, Credential)>,
    pub trust: Option<Trust>,
    /// Connect and no-data timeout of the transport; also bounds the whole fetch at ten times that.
    pub timeout: Duration,
}

impl Default for RemoteAccess {
    fn default() -> RemoteAccess {
        RemoteAccess {
            credential: None,
            trust: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Connect and no-data timeout of a fetch unless `RUNNER_GIT_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// OpenSSH's fingerprint of a host key blob: `SHA256:` and the unpadded base64 of its SHA-256.
pub fn fingerprint(key: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(key))
    )
}

/// The result of looking a host key up in `known_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    Trusted,
    /// The host is listed, with other keys only: the server's key changed, or someone is in between.
    Mismatch,
    Unknown,
    Revoked,
}

/// Looks `key` (the raw blob) for `host` (`host` or `[host]:port`) up in known_hosts text: plain, comma-separated,
/// wildcard and hashed (`|1|salt|hash`) host patterns, negations, and `@revoked` lines; `@cert-authority` lines are
/// not used.
pub fn check_host_key(known_hosts: &str, host: &str, key: &[u8]) -> HostKeyCheck {
    let mut listed = false;
    for line in known_hosts.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let mut revoked = false;
        if first.starts_with('@') {
            match first {
                "@revoked" => revoked = true,
                _ => continue,
            }
            first = fields.next().unwrap_or_default();
        }
        let (Some(_kind), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(first, host) {
            continue;
        }
        let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(blob) else {
            continue;
        };
        let same = blob == key;
        if revoked {
            if same {
                return HostKeyCheck::Revoked;
            }
            continue;
        }
        if same {
            return HostKeyCheck::Trusted;
        }
        listed = true;
    }
    if listed {
        HostKeyCheck::Mismatch
    } else {
        HostKeyCheck::Unknown
    }
}

fn hosts_match(patterns: &str, host: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, host);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated, host) {
                return false;
            }
        } else if glob(pattern, host) {
            matched = true;
        }
    }
    matched
}

fn hashed_match(hashed: &str, host: &str) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (engine.decode(salt), engine.decode(hash)) else {
        return false;
    };
    let Ok(pkey) = openssl::pkey::PKey::hmac(&salt) else {
        return false;
    };
    let Ok(mut signer) = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha1(), &pkey)
    else {
        return false;
    };
    signer
        .sign_oneshot_to_vec(host.as_bytes())
        .is_ok_and(|mac| mac == hash)
}

/// `*` and `?` wildcards, as OpenSSH's host patterns (case-insensitive).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (
        pattern.to_ascii_lowercase().chars().collect(),
        text.to_ascii_lowercase().chars().collect(),
    );
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The name OpenSSH gives a host key type in `known_hosts`.
pub fn key_type_name(kind: Option<git2::cert::SshHostKeyType>) -> &'static str {
    use git2::cert::SshHostKeyType as K;
    match kind {
        Some(K::Rsa) => "ssh-rsa",
        Some(K::Dss) => "ssh-dss",
        Some(K::Ecdsa256) => "ecdsa-sha2-nistp256",
        Some(K::Ecdsa384) => "ecdsa-sha2-nistp384",
        Some(K::Ecdsa521) => "ecdsa-sha2-nistp521",
        Some(K::Ed255219) => "ssh-ed25519",
        _ => "unknown",
    }
}

/// Whether `der` (a server's leaf certificate) chains to a certificate of the PEM bundle at `path` and names
/// `host`. Certificates in the bundle are trust anchors, intermediates included.
pub fn trusted_by_bundle(path: &Path, der: &[u8], host: &str) -> Result<bool, RemoteError> {
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::verify::X509VerifyFlags;
    use openssl::x509::{X509StoreContext, X509};
    let bundle_error = |message: String| RemoteError::CaBundle {
        path: path.to_owned(),
        message,
    };
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(bundle_error(e.to_string())),
    };
    let anchors = X509::stack_from_pem(&pem).map_err(|e| bundle_error(e.to_string()))?;
    if anchors.is_empty() {
        return Err(bundle_error("it holds no PEM certificate".into()));
    }
    let Ok(leaf) = X509::from_der(der) else {
        return Ok(false);
    };
    if !names_host(&leaf, host) {
        return Ok(false);
    }
    let openssl_error = |e: openssl::error::ErrorStack| bundle_error(e.to_string());
    let mut store = X509StoreBuilder::new().map_err(openssl_error)?;
    for anchor in anchors {
        store.add_cert(anchor).map_err(openssl_error)?;
    }
    store
        .set_flags(X509VerifyFlags::PARTIAL_CHAIN)
        .map_err(openssl_error)?;
    let store = store.build();
    let chain = openssl::stack::Stack::new().map_err(openssl_error)?;
    let mut context = X509StoreContext::new().map_err(openssl_error)?;
    context
        .init(&store, &leaf, &chain, |c| c.verify_cert())
        .map_err(openssl_error)
}

fn names_host(leaf: &openssl::x509::X509, host: &str) -> bool {
    let Some(names) = leaf.subject_alt_names() else {
        return false;
    };
    let ip: Option<std::net::IpAddr> = host.trim_matches(['[', ']']).parse().ok();
    names
        .iter()
        .any(|name| match (ip, name.ipaddress(), name.dnsname()) {
            (Some(ip), Some(bytes), _) => match ip {
                std::net::IpAddr::V4(v4) => bytes == v4.octets(),
                std::net::IpAddr::V6(v6) => bytes == v6.octets(),
            },
            (None, _, Some(dns)) => match dns.strip_prefix("*.") {
                Some(domain) => host
                    .split_once('.')
                    .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(domain)),
                None => dns.eq_ignore_ascii_case(host),
            },
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms_are_told_apart() {
        let ssh = parse_url("git@example.com:team/repo.git").unwrap();
        assert_eq!(
            (ssh.transport, ssh.host.as_str(), ssh.port),
            (Transport::Ssh, "example.com", None)
        );
        assert_eq!(ssh.user.as_deref(), Some("git"));
        let ssh = parse_url("ssh://git@example.com:2222/team/repo.git").unwrap();
        assert_eq!((ssh.transport, ssh.port), (Transport::Ssh, Some(2222)));
        assert_eq!(ssh.known_hosts_name(), "[example.com]:2222");
        let https = parse_url("https://example.com/team/repo.git").unwrap();
        assert_eq!(
            (https.transport, https.host.as_str()),
            (Transport::Https, "example.com")
        );
        assert_eq!(
            parse_url("/srv/repo.git").unwrap().transport,
            Transport::Local
        );
        assert_eq!(parse_url("./a:b").unwrap().transport, Transport::Local);
        assert_eq!(
            parse_url("file:///srv/repo").unwrap().transport,
            Transport::Local
        );
        assert!(matches!(
            parse_url("ftp://x/y"),
            Err(RemoteError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_url("https://[::1/x"),
            Err(RemoteError::Unsupported { .. })
        ));
    }

    #[test]
    fn credentials_in_a_url_are_refused_and_never_shown() {
        for url in [
            "https://user:s3cret@example.com/repo.git",
            "https://s3cret@example.com/repo.git",
            "ssh://git:s3cret@example.com/repo.git",
            "git:s3cret@example.com:repo.git",
        ] {
            let error = parse_url(url).unwrap_err();
            assert!(
                matches!(error, RemoteError::EmbeddedCredentials { .. }),
                "{url}"
            );
            let text = error.to_string();
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("credential secret"), "{text}");
        }
    }

    #[test]
    fn known_hosts_lookup_handles_ports_hashes_and_changed_keys() {
        let key = b"the host key".to_vec();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&key);
        let other = base64::engine::general_purpose::STANDARD.encode(b"another key");
        let text = format!("# comment\n[127.0.0.1]:2222,example.com ssh-ed25519 {encoded}\nchanged.example ssh-ed25519 {other}\n");
        assert_eq!(
            check_host_key(&text, "[127.0.0.1]:2222", &key),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            check_host_key(&text, "example.com", &key),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            check_host_key(&text, "127.0.0.1", &key),
            HostKeyCheck::Unknown
        );
        assert_eq!(
            check_host_key(&text, "changed.example", &key),
            HostKeyCheck::Mismatch
        );
        let revoked = format!("@revoked * ssh-ed25519 {encoded}\n{text}");
        assert_eq!(
            check_host_key(&revoked, "example.com", &key),
            HostKeyCheck::Revoked
        );
        // `ssh-keygen -H` form for "example.com": HMAC-SHA1 keyed by the salt.
        let salt = b"0123456789abcdef0123";
        let pkey = openssl::pkey::PKey::hmac(salt).unwrap();
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha1(), &pkey).unwrap();
        let mac = signer.sign_oneshot_to_vec(b"example.com").unwrap();
        let engine = base64::engine::general_purpose::STANDARD;
        let hashed = format!(
            "|1|{}|{} ssh-ed25519 {encoded}\n",
            engine.encode(salt),
            engine.encode(mac)
        );
        assert_eq!(
            check_host_key(&hashed, "example.com", &key),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            check_host_key(&hashed, "example.org", &key),
            HostKeyCheck::Unknown
        );
        assert!(glob("*.example.com", "git.example.com") && !glob("*.example.com", "example.org"));
    }

    #[test]
    fn fingerprints_are_openssh_sha256() {
        // `ssh-keygen -lf` of this ed25519 public key prints the same fingerprint.
        let blob = base64::engine::general_purpose::STANDARD
            .decode("AAAAC3NzaC1lZDI1NTE5AAAAIKTbZW5UYBedQn62YMpFdxpnJPd6TLfr0jMCo4f/VV7Y")
            .unwrap();
        assert_eq!(
            fingerprint(&blob),
            "SHA256:gr5TvbK9QrTfFquXpa2e20B2urggKqWrSUYd7vZhQpE"
        );
    }

    #[test]
    fn credentials_never_show_in_debug() {
        let values = SecretValues(
            [("GIT_TOKEN".to_owned(), "tok-canary".to_owned())]
                .into_iter()
                .collect(),
        );
        let url = "https://example.com/r.git";
        let credential =
            Credential::from_secret("git-demo", &values, url, &parse_url(url).unwrap()).unwrap();
        assert!(!format!("{credential:?}").contains("tok-canary"));
        let ssh = "git@example.com:r.git";
        let error = Credential::from_secret("git-demo", &values, ssh, &parse_url(ssh).unwrap())
            .unwrap_err();
        assert!(error.to_string().contains("GIT_SSH_KEY"), "{error}");
        let http = "http://example.com/r.git";
        let error = Credential::from_secret("git-demo", &values, http, &parse_url(http).unwrap())
            .unwrap_err();
        assert!(error.to_string().contains("unencrypted"), "{error}");
    }
}
