//! `ProjectService`: thin handlers over [`App`].

use tonic::{Request, Response, Status};

use super::{convert, idempotency, pb};
use crate::app::{App, Scope};
use crate::error::Error;
use crate::properties;
use crate::store::WrittenBy;

pub struct Projects {
    pub app: App,
}

fn scope(scope: Option<pb::Scope>) -> Result<Scope, Status> {
    let scope = scope.ok_or_else(|| super::status::required("scope"))?;
    if scope.project.is_empty() {
        return Err(super::status::required("scope.project"));
    }
    Ok(match scope.environment.is_empty() {
        true => Scope::Project {
            project: scope.project,
        },
        false => Scope::Environment {
            project: scope.project,
            environment: scope.environment,
        },
    })
}

#[tonic::async_trait]
impl pb::project_service_server::ProjectService for Projects {
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (project, _) =
            idempotency::once(&self.app.store, "CreateProject", request_id, &r, || async {
                let remote = (!r.git_remote.is_empty()).then_some(r.git_remote.as_str());
                let credential =
                    (!r.git_credential.is_empty()).then_some(r.git_credential.as_str());
                Ok(convert::project(
                    self.app
                        .create_project_with_credential(&r.code, &r.name, remote, credential)
                        .await?,
                ))
            })
            .await?;
        Ok(Response::new(project))
    }

    async fn list_projects(
        &self,
        _: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let projects = self.app.store.list_projects().await.map_err(Error::from)?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(convert::project).collect(),
        }))
    }

    async fn set_git_remote(
        &self,
        request: Request<pb::SetGitRemoteRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (project, _) =
            idempotency::once(&self.app.store, "SetGitRemote", request_id, &r, || async {
                let credential =
                    (!r.git_credential.is_empty()).then_some(r.git_credential.as_str());
                let project = self
                    .app
                    .set_git_remote(&r.project, &r.git_remote, credential)
                    .await?;
                Ok(convert::project(project))
            })
            .await?;
        Ok(Response::new(project))
    }

    async fn fetch_project(
        &self,
        request: Request<pb::FetchProjectRequest>,
    ) -> Result<Response<pb::FetchProjectResponse>, Status> {
        let r = request.into_inner();
        let report = self
            .app
            .fetch_project(&r.project, crate::runtime::git_timeout()?)
            .await?;
        Ok(Response::new(pb::FetchProjectResponse {
            project: report.project,
            git_remote: report.git_remote,
            refs: report.refs,
        }))
    }

    async fn create_environment(
        &self,
        request: Request<pb::CreateEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (environment, _) = idempotency::once(
            &self.app.store,
            "CreateEnvironment",
            request_id,
            &r,
            || async {
                Ok(convert::environment(
                    self.app
                        .create_environment(&r.project, &r.code, &r.name)
                        .await?,
                ))
            },
        )
        .await?;
        Ok(Response::new(environment))
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let environments = self
            .app
            .store
            .list_environments(&request.into_inner().project)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: environments.into_iter().map(convert::environment).collect(),
        }))
    }

    async fn get_base_image(
        &self,
        request: Request<pb::GetBaseImageRequest>,
    ) -> Result<Response<pb::BaseImage>, Status> {
        let r = request.into_inner();
        let base = self.app.base_image(&scope(r.scope)?).await?;
        Ok(Response::new(convert::base_image(base)))
    }

    async fn set_base_image(
        &self,
        request: Request<pb::SetBaseImageRequest>,
    ) -> Result<Response<pb::BaseImage>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (base, _) =
            idempotency::once(&self.app.store, "SetBaseImage", request_id, &r, || async {
                let image = (!r.image.is_empty()).then_some(r.image.as_str());
                let base = self
                    .app
                    .set_base_image(&scope(r.scope.clone())?, image)
                    .await?;
                Ok(convert::base_image(base))
            })
            .await?;
        Ok(Response::new(base))
    }

    async fn get_properties(
        &self,
        request: Request<pb::GetPropertiesRequest>,
    ) -> Result<Response<pb::PropertiesVersion>, Status> {
        let r = request.into_inner();
        let version = (r.version > 0).then_some(r.version);
        Ok(Response::new(convert::properties(
            self.app.properties(&scope(r.scope)?, version).await?,
        )))
    }

    async fn set_properties(
        &self,
        request: Request<pb::SetPropertiesRequest>,
    ) -> Result<Response<pb::PropertiesVersion>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (written, _) =
            idempotency::once(&self.app.store, "SetProperties", request_id, &r, || async {
                let document = properties::parse_document("document_json", &r.document_json)
                    .map_err(Error::from)?;
                let written = self
                    .app
                    .set_properties(
                        &scope(r.scope.clone())?,
                        document,
                        r.if_version,
                        WrittenBy::Api,
                    )
                    .await?;
                Ok(convert::properties(written))
            })
            .await?;
        Ok(Response::new(written))
    }

    async fn patch_properties(
        &self,
        request: Request<pb::PatchPropertiesRequest>,
    ) -> Result<Response<pb::PropertiesVersion>, Status> {
        let mut r = request.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (written, _) = idempotency::once(
            &self.app.store,
            "PatchProperties",
            request_id,
            &r,
            || async {
                let patch =
                    properties::parse_patch("patch_json", &r.patch_json).map_err(Error::from)?;
                let written = self
                    .app
                    .patch_properties(
                        &scope(r.scope.clone())?,
                        &patch,
                        r.if_version,
                        WrittenBy::Api,
                    )
                    .await?;
                Ok(convert::properties(written))
            },
        )
        .await?;
        Ok(Response::new(written))
    }

    async fn properties_history(
        &self,
        request: Request<pb::PropertiesHistoryRequest>,
    ) -> Result<Response<pb::PropertiesHistoryResponse>, Status> {
        let versions = self
            .app
            .properties_history(&scope(request.into_inner().scope)?)
            .await?;
        Ok(Response::new(pb::PropertiesHistoryResponse {
            versions: versions.into_iter().map(convert::properties).collect(),
        }))
    }
}
