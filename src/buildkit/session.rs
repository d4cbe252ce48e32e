//! The build session: what the daemon calls back into while it builds. We serve the local directories (FileSync),
//! the build secrets (Secrets) and a health check over the daemon's hijacked `/session` connection.

use bollard_buildkit_proto::fsutil::types::Packet;
use bollard_buildkit_proto::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use bollard_buildkit_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use bollard_buildkit_proto::moby::filesync::packet::file_sync_server::{FileSync, FileSyncServer};
use futures::Stream;
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::{Request, Response, Status, Streaming};

use super::conn::{upgrade, ConnError, DockerEndpoint};
use super::filesync::{self, Reply};

/// The gRPC methods the session serves; the daemon only routes these to us.
pub const METHODS: [&str; 5] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/moby.filesync.v1.FileSync/DiffCopy",
    "/moby.filesync.v1.FileSync/TarStream",
    "/moby.buildkit.secrets.v1.Secrets/GetSecret",
];

/// What one build may read from us.
#[derive(Clone)]
pub struct SessionContent {
    /// Local directories by the name BuildKit asks for (`context`, `dockerfile`), as handles: nothing outside
    /// them can be served.
    pub dirs: HashMap<String, Arc<cap_std::fs::Dir>>,
    /// Secret id → bytes.
    pub secrets: BTreeMap<String, Vec<u8>>,
}

/// Opens a session on the daemon and serves it in the background until the daemon closes it.
pub async fn start(
    endpoint: &DockerEndpoint,
    id: &str,
    shared_key: &str,
    content: SessionContent,
) -> Result<tokio::task::JoinHandle<()>, ConnError> {
    let mut headers = vec![
        ("X-Docker-Expose-Session-Uuid", id.to_owned()),
        ("X-Docker-Expose-Session-Name", "runner".to_owned()),
        ("X-Docker-Expose-Session-Sharedkey", shared_key.to_owned()),
    ];
    headers.extend(
        METHODS
            .iter()
            .map(|m| ("X-Docker-Expose-Session-Grpc-Method", (*m).to_owned())),
    );
    let io = upgrade(endpoint, "/session", &headers).await?;
    let content = Arc::new(content);
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(FileSyncServer::new(Files {
            content: content.clone(),
        }))
        .add_service(SecretsServer::new(SecretStore { content }));
    Ok(tokio::spawn(async move {
        let incoming = futures::stream::iter([Ok::<_, std::io::Error>(SessionIo(io))]);
        if let Err(e) = server.serve_with_incoming(incoming).await {
            tracing::debug!(error = %e, "build session ended");
        }
    }))
}

/// The upgraded connection, as tonic's server wants it.
struct SessionIo(TokioIo<hyper::upgrade::Upgraded>);

impl tonic::transport::server::Connected for SessionIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for SessionIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct Files {
    content: Arc<SessionContent>,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

fn metadata_values(request: &Request<Streaming<Packet>>, key: &str) -> Vec<String> {
    request
        .metadata()
        .get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect()
}

#[tonic::async_trait]
impl FileSync for Files {
    type DiffCopyStream = PacketStream;
    type TarStreamStream = PacketStream;

    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let name = metadata_values(&request, "dir-name")
            .into_iter()
            .next()
            .unwrap_or_default();
        let dir = self.content.dirs.get(&name).cloned().ok_or_else(|| {
            Status::not_found(format!("no local directory named {name:?} in this session"))
        })?;
        let include = metadata_values(&request, "include-patterns");
        let entries = filesync::list(&dir, &include)
            .map_err(|e| Status::internal(format!("cannot list the directory {name:?}: {e}")))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Packet, Status>>(64);
        tokio::spawn(async move {
            for stat in filesync::stat_packets(&entries) {
                if tx.send(Ok(stat)).await.is_err() {
                    return;
                }
            }
            while let Ok(Some(received)) = inbound.message().await {
                match filesync::reply(&entries, &received) {
                    Ok(Reply::File { id, source }) => {
                        if let Err(e) = filesync::send_file(id, &dir, &source, &tx).await {
                            let _ = tx.send(Err(Status::internal(e))).await;
                            return;
                        }
                    }
                    Ok(Reply::Fin) => {
                        let _ = tx.send(Ok(filesync::fin())).await;
                        return;
                    }
                    Ok(Reply::None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tar_stream(
        &self,
        _: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        Err(Status::unimplemented(
            "TarStream is not served; use DiffCopy",
        ))
    }
}

struct SecretStore {
    content: Arc<SessionContent>,
}

#[tonic::async_trait]
impl Secrets for SecretStore {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let id = request.into_inner().id;
        match self.content.secrets.get(&id) {
            Some(data) => Ok(Response::new(GetSecretResponse { data: data.clone() })),
            None => Err(Status::not_found(format!(
                "secret {id} is not provided to this build"
            ))),
        }
    }
}
