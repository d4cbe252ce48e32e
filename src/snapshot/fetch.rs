//! One fetch of a mirror from its remote: libgit2's callbacks answer the server's credential request from the
//! granted secret, check SSH host keys against the operator's `known_hosts` and TLS certificates against the system
//! roots plus the operator's CA bundle, and stop the transfer when the caller cancels. A failure is classified into
//! what the user should check.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use git2::{CertificateCheckStatus, Cred, CredentialType, FetchOptions, RemoteCallbacks};

use super::remote::{self, Credential, HostKeyCheck, RemoteAccess, RemoteUrl, Transport};
use super::{lock, remove_interrupted_fetches, Mirror, SnapshotError};

/// Why a fetch failed, worded as what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchProblem {
    /// The server asked for credentials and the project has none.
    NoCredential,
    /// The server refused the credential.
    AuthRejected {
        secret: String,
    },
    UnknownHost {
        host: String,
        key_type: String,
        fingerprint: String,
        key: String,
        known_hosts: String,
    },
    HostKeyChanged {
        host: String,
        key_type: String,
        fingerprint: String,
        known_hosts: String,
    },
    HostKeyRevoked {
        host: String,
        fingerprint: String,
    },
    UntrustedCertificate {
        host: String,
        ca_bundle: String,
    },
    Timeout {
        after: Duration,
    },
    Cancelled,
    Network {
        message: String,
    },
    Git {
        message: String,
    },
}

impl FetchProblem {
    /// Whether the same fetch may work later unchanged (the network), as opposed to needing a fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchProblem::Timeout { .. } | FetchProblem::Network { .. } | FetchProblem::Cancelled
        )
    }
}

impl fmt::Display for FetchProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchProblem::NoCredential => write!(
                f,
                "authentication: the server asks for credentials and the project has none: put them in a secret \
                 (`runner secret set NAME GIT_USERNAME=… GIT_TOKEN=…`, or GIT_SSH_KEY=… for SSH), have the operator \
                 grant it to the project in policy.toml, then `runner project set-git-remote --project P --url URL \
                 --credential NAME`"
            ),
            FetchProblem::AuthRejected { secret } => write!(
                f,
                "authentication: the server refused the credential in secret {secret:?}: check its GIT_USERNAME and \
                 GIT_TOKEN/GIT_PASSWORD (HTTPS), or that the public key of its GIT_SSH_KEY is authorised for that \
                 user on the server and GIT_SSH_PASSPHRASE is right (SSH)"
            ),
            FetchProblem::UnknownHost {
                host,
                key_type,
                fingerprint,
                key,
                known_hosts,
            } => write!(
                f,
                "host key: {host} is not in the operator's known_hosts {known_hosts}; it presented the {key_type} \
                 key {fingerprint}. If that is the server's key (ask its administrator, or compare with \
                 `ssh-keygen -lf` on the server), add this line to {known_hosts}: {host} {key_type} {key}"
            ),
            FetchProblem::HostKeyChanged {
                host,
                key_type,
                fingerprint,
                known_hosts,
            } => write!(
                f,
                "host key: {host} presented the {key_type} key {fingerprint}, which is not the key {known_hosts} \
                 lists for it: the server's key changed or someone is in between; refused. Check with the server's \
                 administrator before replacing the line in {known_hosts}"
            ),
            FetchProblem::HostKeyRevoked { host, fingerprint } => write!(
                f,
                "host key: {host} presented the key {fingerprint}, which the operator's known_hosts marks @revoked"
            ),
            FetchProblem::UntrustedCertificate { host, ca_bundle } => write!(
                f,
                "TLS: the certificate of {host} is trusted neither by the system roots nor by the CA bundle \
                 {ca_bundle}: if the server uses a private CA, put that CA's certificate (PEM) in {ca_bundle}"
            ),
            FetchProblem::Timeout { after } => write!(
                f,
                "network: no answer within {}s: check that the host is up and reachable from here, or raise \
                 RUNNER_GIT_TIMEOUT",
                after.as_secs_f64()
            ),
            FetchProblem::Cancelled => write!(f, "cancelled"),
            FetchProblem::Network { message } => write!(
                f,
                "network: {message}: check the host name and port and that the server is reachable from here"
            ),
            FetchProblem::Git { message } => write!(
                f,
                "{message}: check that the repository exists at that path and the credential may read it"
            ),
        }
    }
}

/// libgit2's connect and no-data timeouts are process-wide; every fetch sets the one it was given.
fn set_timeouts(timeout: Duration) {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: these only store an integer libgit2 reads when it opens a socket.
    unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms);
        let _ = git2::opts::set_server_timeout_in_milliseconds(ms);
    }
}

impl Mirror {
    /// Fetches every branch and tag, pruning what the remote deleted, with the project's credential and the
    /// operator's trust anchors. Serialised across processes by a lock file, since two runners may create changes
    /// of one project at once. Setting `cancel` stops the transfer at its next callback.
    pub fn fetch_with(
        &self,
        access: &RemoteAccess,
        cancel: &AtomicBool,
    ) -> Result<(), SnapshotError> {
        self.fetch_watched(access, cancel, &|| {})
    }

    /// [`Mirror::fetch_with`], calling `progress` whenever the remote shows a sign of life.
    pub fn fetch_watched(
        &self,
        access: &RemoteAccess,
        cancel: &AtomicBool,
        progress: &dyn Fn(),
    ) -> Result<(), SnapshotError> {
        let url = remote::parse_url(&self.remote)?;
        let credential = match &access.credential {
            // Never send a credential where it is not for (plain HTTP, git://, a local path).
            Some((name, _)) if !matches!(url.transport, Transport::Https | Transport::Ssh) => {
                return Err(remote::RemoteError::CredentialUnusable {
                    secret: name.clone(),
                    transport: url.transport,
                    url: self.remote.clone(),
                    reason: "only HTTPS and SSH remotes take a credential".into(),
                }
                .into());
            }
            Some((name, credential)) => Some((name.as_str(), credential)),
            None => None,
        };
        let _lock = lock(self.repo.path())?;
        let removed = remove_interrupted_fetches(self.repo.path())?;
        if !removed.is_empty() {
            tracing::info!(mirror = %self.repo.path().display(), ?removed, "removed what an interrupted fetch left");
        }
        set_timeouts(access.timeout);
        let problem: RefCell<Option<FetchProblem>> = RefCell::new(None);
        let tls_host = RefCell::new(None::<String>);
        let result = {
            let mut callbacks = RemoteCallbacks::new();
            let attempts = Cell::new(0u32);
            callbacks.credentials(|_url, url_user, allowed| {
                progress();
                answer_credentials(&url, credential, url_user, allowed, &attempts, &problem)
            });
            callbacks.certificate_check(|cert, host| {
                progress();
                if cancel.load(Ordering::Relaxed) {
                    return Err(git2::Error::from_str("cancelled"));
                }
                check_certificate(access, &url, cert, host, &problem, &tls_host)
            });
            callbacks.transfer_progress(|_| {
                progress();
                !cancel.load(Ordering::Relaxed)
            });
            callbacks.sideband_progress(|_| {
                progress();
                !cancel.load(Ordering::Relaxed)
            });
            let mut options = FetchOptions::new();
            options
                .remote_callbacks(callbacks)
                .prune(git2::FetchPrune::On)
                .download_tags(git2::AutotagOption::All);
            let mut remote = self
                .repo
                .remote_anonymous(&self.remote)
                .map_err(|e| self.failed(&url, git(e)))?;
            let result = remote.fetch(
                &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                Some(&mut options),
                None,
            );
            result.map_err(|e| {
                if cancel.load(Ordering::Relaxed) {
                    return FetchProblem::Cancelled;
                }
                if let Some(problem) = problem.borrow_mut().take() {
                    return problem;
                }
                classify(
                    &e,
                    access,
                    tls_host.borrow().as_deref().unwrap_or(&url.host),
                )
            })
        };
        result.map_err(|problem| self.failed(&url, problem))
    }

    fn failed(&self, url: &RemoteUrl, problem: FetchProblem) -> SnapshotError {
        SnapshotError::Fetch {
            remote: self.remote.clone(),
            transport: url.transport,
            problem: Box::new(problem),
        }
    }
}

fn git(e: git2::Error) -> FetchProblem {
    FetchProblem::Git {
        message: e.message().to_owned(),
    }
}

fn answer_credentials(
    url: &RemoteUrl,
    credential: Option<(&str, &Credential)>,
    url_user: Option<&str>,
    allowed: CredentialType,
    attempts: &Cell<u32>,
    problem: &RefCell<Option<FetchProblem>>,
) -> Result<Cred, git2::Error> {
    let refuse = |p: FetchProblem| {
        *problem.borrow_mut() = Some(p);
        Err(git2::Error::from_str("authentication failed"))
    };
    let Some((secret, credential)) = credential else {
        return refuse(FetchProblem::NoCredential);
    };
    let ssh_user = || match credential {
        Credential::SshKey {
            username: Some(user),
            ..
        } => user.clone(),
        _ => url_user
            .map(str::to_owned)
            .or_else(|| url.user.clone())
            .unwrap_or_else(|| "git".into()),
    };
    // SSH first asks for the user name alone when the URL has none; that is not an attempt.
    if allowed == CredentialType::USERNAME {
        return Cred::username(&ssh_user());
    }
    attempts.set(attempts.get() + 1);
    if attempts.get() > 1 {
        return refuse(FetchProblem::AuthRejected {
            secret: secret.to_owned(),
        });
    }
    match credential {
        Credential::UserPassword { username, password }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
        {
            Cred::userpass_plaintext(username, password)
        }
        Credential::SshKey {
            private_key,
            passphrase,
            ..
        } if allowed.contains(CredentialType::SSH_MEMORY)
            || allowed.contains(CredentialType::SSH_KEY) =>
        {
            Cred::ssh_key_from_memory(&ssh_user(), None, private_key, passphrase.as_deref())
        }
        _ => refuse(FetchProblem::AuthRejected {
            secret: secret.to_owned(),
        }),
    }
}

fn check_certificate(
    access: &RemoteAccess,
    url: &RemoteUrl,
    cert: &git2::cert::Cert<'_>,
    host: &str,
    problem: &RefCell<Option<FetchProblem>>,
    tls_host: &RefCell<Option<String>>,
) -> Result<CertificateCheckStatus, git2::Error> {
    let refuse = |p: FetchProblem| {
        *problem.borrow_mut() = Some(p);
        Err(git2::Error::from_str("certificate refused"))
    };
    if let Some(hostkey) = cert.as_hostkey() {
        let name = RemoteUrl {
            host: host.to_owned(),
            ..url.clone()
        }
        .known_hosts_name();
        let Some(key) = hostkey.hostkey() else {
            return refuse(FetchProblem::Git {
                message: "the SSH library did not hand over the server's host key".into(),
            });
        };
        let key_type = remote::key_type_name(hostkey.hostkey_type()).to_owned();
        let fingerprint = remote::fingerprint(key);
        let (path, text) = match &access.trust {
            Some(trust) => (
                trust.known_hosts.display().to_string(),
                std::fs::read_to_string(&trust.known_hosts).unwrap_or_default(),
            ),
            None => ("(none configured)".to_owned(), String::new()),
        };
        return match remote::check_host_key(&text, &name, key) {
            HostKeyCheck::Trusted => Ok(CertificateCheckStatus::CertificateOk),
            HostKeyCheck::Unknown => refuse(FetchProblem::UnknownHost {
                host: name,
                key_type,
                fingerprint,
                key: base64::engine::general_purpose::STANDARD.encode(key),
                known_hosts: path,
            }),
            HostKeyCheck::Mismatch => refuse(FetchProblem::HostKeyChanged {
                host: name,
                key_type,
                fingerprint,
                known_hosts: path,
            }),
            HostKeyCheck::Revoked => refuse(FetchProblem::HostKeyRevoked {
                host: name,
                fingerprint,
            }),
        };
    }
    if let Some(x509) = cert.as_x509() {
        *tls_host.borrow_mut() = Some(host.to_owned());
        if let Some(trust) = &access.trust {
            match remote::trusted_by_bundle(&trust.ca_bundle, x509.data(), host) {
                Ok(true) => return Ok(CertificateCheckStatus::CertificateOk),
                Ok(false) => {}
                Err(e) => {
                    return refuse(FetchProblem::Git {
                        message: e.to_string(),
                    })
                }
            }
        }
    }
    // Whatever libgit2 decided against the system roots (and host name) stands.
    Ok(CertificateCheckStatus::CertificatePassthrough)
}

/// What a libgit2 error says to check, when no callback recorded a more precise reason.
fn classify(e: &git2::Error, access: &RemoteAccess, host: &str) -> FetchProblem {
    let message = e.message().to_owned();
    let lower = message.to_ascii_lowercase();
    if e.code() == git2::ErrorCode::Certificate || lower.contains("certificate") {
        return FetchProblem::UntrustedCertificate {
            host: host.to_owned(),
            ca_bundle: access
                .trust
                .as_ref()
                .map(|t| t.ca_bundle.display().to_string())
                .unwrap_or_else(|| "(none configured)".into()),
        };
    }
    if e.code() == git2::ErrorCode::Auth || lower.contains("authentication") {
        return FetchProblem::NoCredential;
    }
    if lower.contains("timed out") || lower.contains("timeout") {
        return FetchProblem::Timeout {
            after: access.timeout,
        };
    }
    if matches!(
        e.class(),
        git2::ErrorClass::Net
            | git2::ErrorClass::Os
            | git2::ErrorClass::Ssh
            | git2::ErrorClass::Http
    ) && !lower.contains("not found")
        && !lower.contains("repository")
    {
        return FetchProblem::Network { message };
    }
    FetchProblem::Git { message }
}
