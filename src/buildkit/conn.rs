//! The two connections BuildKit is driven over: HTTP/1.1 requests to the Docker Engine's unix socket that are
//! upgraded to raw HTTP/2 (h2c). `/session` carries gRPC from the daemon to us, `/grpc` from us to the daemon.

use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};

/// Where the Docker Engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerEndpoint {
    pub socket: PathBuf,
}

impl DockerEndpoint {
    /// `DOCKER_HOST` (`unix://…`) or the default socket.
    pub fn from_env() -> DockerEndpoint {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        DockerEndpoint { socket }
    }

    pub fn unix(socket: impl AsRef<Path>) -> DockerEndpoint {
        DockerEndpoint {
            socket: socket.as_ref().to_owned(),
        }
    }
}

impl std::fmt::Display for DockerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unix://{}", self.socket.display())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP exchange with {endpoint} failed: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{endpoint} answered {status} to POST {path} instead of switching protocols: {body}")]
    NotUpgraded {
        endpoint: String,
        path: String,
        status: http::StatusCode,
        body: String,
    },
}

/// POSTs `path` with `Connection: Upgrade` / `Upgrade: h2c` and the given headers; returns the raw connection
/// once the daemon answered `101 Switching Protocols`.
pub async fn upgrade(
    endpoint: &DockerEndpoint,
    path: &str,
    headers: &[(&str, String)],
) -> Result<TokioIo<Upgraded>, ConnError> {
    let stream = tokio::net::UnixStream::connect(&endpoint.socket)
        .await
        .map_err(|source| ConnError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let http_error = |source| ConnError::Http {
        endpoint: endpoint.to_string(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "docker upgrade connection ended");
        }
    });
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::HOST, "docker")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "h2c");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request
        .body(Empty::<bytes::Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.map_err(http_error)?;
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(ConnError::NotUpgraded {
            endpoint: endpoint.to_string(),
            path: path.to_owned(),
            status,
            body,
        });
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(http_error)?;
    Ok(TokioIo::new(upgraded))
}
