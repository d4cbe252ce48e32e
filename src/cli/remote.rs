//! `--server URL`: the CLI's commands over gRPC instead of the local store, rendered exactly as locally.

use serde_json::Value;
use tonic::transport::Channel;
use tonic::Request;

use crate::app::{App, Scope};
use crate::error::{Error, Result};
use crate::grpc::convert;
use crate::grpc::pb::{
    self, change_service_client::ChangeServiceClient, project_service_client::ProjectServiceClient,
};
use crate::properties::Patch;
use crate::store::{Environment, Project, PropertiesVersion, WrittenBy};

/// A connection to `runner serve`.
#[derive(Clone)]
pub struct Remote {
    channel: Channel,
    token: Option<crate::grpc::auth::Token>,
    url: String,
}

impl Remote {
    pub async fn connect(
        url: &str,
        token: Option<String>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<Remote> {
        // An empty or blank token is refused here with the server's message, never sent as "no token".
        let token = token
            .as_deref()
            .map(crate::grpc::auth::Token::new)
            .transpose()?;
        let unreachable = |message: String| Error::Remote {
            code: tonic::Code::Unavailable,
            message,
        };
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| {
                unreachable(format!(
                    "invalid server URL {url:?}: {e} (write e.g. http://127.0.0.1:50051)"
                ))
            })?;
        if let Some(ca) = tls_ca {
            let pem = std::fs::read(ca).map_err(|source| Error::ReadFile {
                path: ca.to_owned(),
                source,
            })?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| unreachable(format!("invalid TLS settings for {url}: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            unreachable(format!(
                "cannot reach the runner server at {url}: {} (is `runner serve` running?)",
                crate::error::error_text(&e)
            ))
        })?;
        Ok(Remote {
            channel,
            token,
            url: url.to_owned(),
        })
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            if let Ok(value) = format!("Bearer {}", token.as_str()).parse() {
                request.metadata_mut().insert("authorization", value);
            }
        }
        request
    }

    pub fn projects(&self) -> ProjectServiceClient<Channel> {
        ProjectServiceClient::new(self.channel.clone())
    }

    pub fn changes(&self) -> ChangeServiceClient<Channel> {
        ChangeServiceClient::new(self.channel.clone())
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A failed call, as the server explained it.
pub fn status(status: tonic::Status) -> Error {
    Error::Remote {
        code: status.code(),
        message: status.message().to_owned(),
    }
}

fn scope(scope: &Scope) -> Option<pb::Scope> {
    Some(match scope {
        Scope::Project { project } => pb::Scope {
            project: project.clone(),
            environment: String::new(),
        },
        Scope::Environment {
            project,
            environment,
        } => pb::Scope {
            project: project.clone(),
            environment: environment.clone(),
        },
    })
}

/// Where project, environment and properties commands go.
pub enum Backend {
    Local(App),
    Remote(Remote),
}

impl Backend {
    pub async fn create_project(
        &self,
        code: &str,
        name: &str,
        git_remote: Option<&str>,
        git_credential: Option<&str>,
    ) -> Result<Project> {
        match self {
            Backend::Local(app) => {
                app.create_project_with_credential(code, name, git_remote, git_credential)
                    .await
            }
            Backend::Remote(r) => {
                let request = pb::CreateProjectRequest {
                    code: code.into(),
                    name: name.into(),
                    git_remote: git_remote.unwrap_or_default().into(),
                    git_credential: git_credential.unwrap_or_default().into(),
                    ..Default::default()
                };
                Ok(convert::project_from(
                    r.projects()
                        .create_project(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn fetch_project(&self, project: &str) -> Result<crate::app::FetchReport> {
        match self {
            Backend::Local(app) => {
                app.fetch_project(project, crate::runtime::git_timeout()?)
                    .await
            }
            Backend::Remote(r) => {
                let request = pb::FetchProjectRequest {
                    project: project.into(),
                };
                let done = r
                    .projects()
                    .fetch_project(r.request(request))
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(crate::app::FetchReport {
                    project: done.project,
                    git_remote: done.git_remote,
                    refs: done.refs,
                })
            }
        }
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>> {
        match self {
            Backend::Local(app) => Ok(app.store.list_projects().await?),
            Backend::Remote(r) => {
                // Every page, as local mode lists every project.
                let (mut all, mut page_token) = (Vec::new(), String::new());
                loop {
                    let request = pb::ListProjectsRequest {
                        page_size: 1000,
                        page_token,
                    };
                    let list = r
                        .projects()
                        .list_projects(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner();
                    all.extend(list.projects.into_iter().map(convert::project_from));
                    if list.next_page_token.is_empty() {
                        return Ok(all);
                    }
                    page_token = list.next_page_token;
                }
            }
        }
    }

    pub async fn set_git_remote(
        &self,
        project: &str,
        url: &str,
        credential: Option<&str>,
    ) -> Result<Project> {
        match self {
            Backend::Local(app) => app.set_git_remote(project, url, credential).await,
            Backend::Remote(r) => {
                let request = pb::SetGitRemoteRequest {
                    project: project.into(),
                    git_remote: url.into(),
                    git_credential: credential.unwrap_or_default().into(),
                    ..Default::default()
                };
                Ok(convert::project_from(
                    r.projects()
                        .set_git_remote(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn create_environment(
        &self,
        project: &str,
        code: &str,
        name: &str,
    ) -> Result<Environment> {
        match self {
            Backend::Local(app) => app.create_environment(project, code, name).await,
            Backend::Remote(r) => {
                let request = pb::CreateEnvironmentRequest {
                    project: project.into(),
                    code: code.into(),
                    name: name.into(),
                    ..Default::default()
                };
                Ok(convert::environment_from(
                    r.projects()
                        .create_environment(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn list_environments(&self, project: &str) -> Result<Vec<Environment>> {
        match self {
            Backend::Local(app) => Ok(app.store.list_environments(project).await?),
            Backend::Remote(r) => {
                let (mut all, mut page_token) = (Vec::new(), String::new());
                loop {
                    let request = pb::ListEnvironmentsRequest {
                        project: project.into(),
                        page_size: 1000,
                        page_token,
                    };
                    let list = r
                        .projects()
                        .list_environments(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner();
                    all.extend(list.environments.into_iter().map(convert::environment_from));
                    if list.next_page_token.is_empty() {
                        return Ok(all);
                    }
                    page_token = list.next_page_token;
                }
            }
        }
    }

    pub async fn base_image(&self, s: &Scope) -> Result<crate::app::BaseImage> {
        match self {
            Backend::Local(app) => app.base_image(s).await,
            Backend::Remote(r) => {
                let request = pb::GetBaseImageRequest { scope: scope(s) };
                Ok(convert::base_image_from(
                    r.projects()
                        .get_base_image(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn set_base_image(
        &self,
        s: &Scope,
        image: Option<&str>,
    ) -> Result<crate::app::BaseImage> {
        match self {
            Backend::Local(app) => app.set_base_image(s, image).await,
            Backend::Remote(r) => {
                let request = pb::SetBaseImageRequest {
                    scope: scope(s),
                    image: image.unwrap_or_default().to_owned(),
                    ..Default::default()
                };
                Ok(convert::base_image_from(
                    r.projects()
                        .set_base_image(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn properties(&self, s: &Scope, version: Option<i64>) -> Result<PropertiesVersion> {
        match self {
            Backend::Local(app) => app.properties(s, version).await,
            Backend::Remote(r) => {
                let request = pb::GetPropertiesRequest {
                    scope: scope(s),
                    version: version.unwrap_or(0),
                };
                Ok(convert::properties_from(
                    r.projects()
                        .get_properties(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn set_properties(
        &self,
        s: &Scope,
        document: Value,
        if_version: Option<i64>,
    ) -> Result<PropertiesVersion> {
        match self {
            Backend::Local(app) => {
                app.set_properties(s, document, if_version, WrittenBy::Cli)
                    .await
            }
            Backend::Remote(r) => {
                let request = pb::SetPropertiesRequest {
                    scope: scope(s),
                    document_json: document.to_string(),
                    if_version,
                    ..Default::default()
                };
                Ok(convert::properties_from(
                    r.projects()
                        .set_properties(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn patch_properties(
        &self,
        s: &Scope,
        patch: &Patch,
        if_version: Option<i64>,
    ) -> Result<PropertiesVersion> {
        match self {
            Backend::Local(app) => {
                app.patch_properties(s, patch, if_version, WrittenBy::Cli)
                    .await
            }
            Backend::Remote(r) => {
                let patch_json = serde_json::to_string(patch).expect("a patch serialises");
                let request = pb::PatchPropertiesRequest {
                    scope: scope(s),
                    patch_json,
                    if_version,
                    ..Default::default()
                };
                Ok(convert::properties_from(
                    r.projects()
                        .patch_properties(r.request(request))
                        .await
                        .map_err(status)?
                        .into_inner(),
                ))
            }
        }
    }

    pub async fn properties_history(&self, s: &Scope) -> Result<Vec<PropertiesVersion>> {
        match self {
            Backend::Local(app) => app.properties_history(s).await,
            Backend::Remote(r) => {
                let request = pb::PropertiesHistoryRequest { scope: scope(s) };
                let history = r
                    .projects()
                    .properties_history(r.request(request))
                    .await
                    .map_err(status)?
                    .into_inner();
                Ok(history
                    .versions
                    .into_iter()
                    .map(convert::properties_from)
                    .collect())
            }
        }
    }
}
