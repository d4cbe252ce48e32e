//! `ProjectService`: thin handlers over [`App`].

use tonic::{Request, Response, Status};

use super::{code_pages, convert, idempotency, pb};
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
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let r = request.into_inner();
        let page = code_pages::Page::of("projects", r.page_size, &r.page_token)?;
        let projects = self
            .app
            .store
            .projects_after(page.after(), page.fetch())
            .await
            .map_err(Error::from)?;
        let (projects, next_page_token) = page.cut(projects, |p| &p.code);
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(convert::project).collect(),
            next_page_token,
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

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        Ok(Response::new(
            self.get_project_of(request.into_inner()).await?,
        ))
    }

    async fn update_project(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        Ok(Response::new(
            self.update_project_of(request.into_inner()).await?,
        ))
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete_project_of(request.into_inner()).await?;
        Ok(Response::new(()))
    }

    async fn get_environment(
        &self,
        request: Request<pb::GetEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        Ok(Response::new(
            self.get_environment_of(request.into_inner()).await?,
        ))
    }

    async fn update_environment(
        &self,
        request: Request<pb::UpdateEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        Ok(Response::new(
            self.update_environment_of(request.into_inner()).await?,
        ))
    }

    async fn delete_environment(
        &self,
        request: Request<pb::DeleteEnvironmentRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete_environment_of(request.into_inner()).await?;
        Ok(Response::new(()))
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let r = request.into_inner();
        let page = code_pages::Page::of(
            &format!("environments of {}", r.project),
            r.page_size,
            &r.page_token,
        )?;
        let environments = self
            .app
            .store
            .environments_after(&r.project, page.after(), page.fetch())
            .await
            .map_err(Error::from)?;
        let (environments, next_page_token) = page.cut(environments, |e| &e.code);
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: environments.into_iter().map(convert::environment).collect(),
            next_page_token,
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

fn mask_paths(
    mask: Option<prost_types::FieldMask>,
    allowed: &[&str],
) -> Result<Vec<String>, Status> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(super::status::required("update_mask"));
    }
    if let Some(bad) = paths.iter().find(|p| !allowed.contains(&p.as_str())) {
        return Err(super::status::bad_field(
            "INVALID_UPDATE_MASK",
            "update_mask",
            format!(
                "update_mask path {bad:?} cannot be updated: use {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(paths)
}

/// Get, update (field mask) and delete of projects and environments.
impl Projects {
    pub async fn get_project_of(&self, r: pb::GetProjectRequest) -> Result<pb::Project, Status> {
        if r.project.is_empty() {
            return Err(super::status::required("project"));
        }
        Ok(convert::project(
            self.app
                .store
                .project(&r.project)
                .await
                .map_err(Error::from)?,
        ))
    }

    pub async fn update_project_of(
        &self,
        mut r: pb::UpdateProjectRequest,
    ) -> Result<pb::Project, Status> {
        let request_id = std::mem::take(&mut r.request_id);
        let (project, _) =
            idempotency::once(&self.app.store, "UpdateProject", request_id, &r, || async {
                let given = r
                    .project
                    .clone()
                    .ok_or_else(|| super::status::required("project"))?;
                if given.code.is_empty() {
                    return Err(super::status::required("project.code"));
                }
                let paths = mask_paths(
                    r.update_mask.clone(),
                    &["name", "git_remote", "git_credential"],
                )?;
                let current = self
                    .app
                    .store
                    .project(&given.code)
                    .await
                    .map_err(Error::from)?;
                if paths
                    .iter()
                    .any(|p| p == "git_remote" || p == "git_credential")
                {
                    let remote = if paths.iter().any(|p| p == "git_remote") {
                        given.git_remote.clone()
                    } else {
                        current.git_remote.clone().unwrap_or_default()
                    };
                    let credential = if paths.iter().any(|p| p == "git_credential") {
                        given.git_credential.clone()
                    } else {
                        current.git_credential.clone().unwrap_or_default()
                    };
                    let credential = (!credential.is_empty()).then_some(credential.as_str());
                    self.app
                        .set_git_remote(&given.code, &remote, credential)
                        .await?;
                }
                if paths.iter().any(|p| p == "name") {
                    if given.name.trim().is_empty() {
                        return Err(super::status::required("project.name"));
                    }
                    self.app
                        .store
                        .rename_project(&given.code, &given.name)
                        .await
                        .map_err(Error::from)?;
                }
                Ok(convert::project(
                    self.app
                        .store
                        .project(&given.code)
                        .await
                        .map_err(Error::from)?,
                ))
            })
            .await?;
        Ok(project)
    }

    pub async fn delete_project_of(&self, mut r: pb::DeleteProjectRequest) -> Result<(), Status> {
        if r.project.is_empty() {
            return Err(super::status::required("project"));
        }
        let request_id = std::mem::take(&mut r.request_id);
        idempotency::once(&self.app.store, "DeleteProject", request_id, &r, || async {
            self.app
                .store
                .delete_project(&r.project)
                .await
                .map_err(Error::from)?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    pub async fn get_environment_of(
        &self,
        r: pb::GetEnvironmentRequest,
    ) -> Result<pb::Environment, Status> {
        for (field, value) in [("project", &r.project), ("environment", &r.environment)] {
            if value.is_empty() {
                return Err(super::status::required(field));
            }
        }
        Ok(convert::environment(
            self.app
                .store
                .environment(&r.project, &r.environment)
                .await
                .map_err(Error::from)?,
        ))
    }

    pub async fn update_environment_of(
        &self,
        mut r: pb::UpdateEnvironmentRequest,
    ) -> Result<pb::Environment, Status> {
        let request_id = std::mem::take(&mut r.request_id);
        let (environment, _) = idempotency::once(
            &self.app.store,
            "UpdateEnvironment",
            request_id,
            &r,
            || async {
                let given = r
                    .environment
                    .clone()
                    .ok_or_else(|| super::status::required("environment"))?;
                if given.project.is_empty() || given.code.is_empty() {
                    return Err(super::status::required(
                        "environment.project and environment.code",
                    ));
                }
                mask_paths(r.update_mask.clone(), &["name"])?;
                if given.name.trim().is_empty() {
                    return Err(super::status::required("environment.name"));
                }
                Ok(convert::environment(
                    self.app
                        .store
                        .rename_environment(&given.project, &given.code, &given.name)
                        .await
                        .map_err(Error::from)?,
                ))
            },
        )
        .await?;
        Ok(environment)
    }

    pub async fn delete_environment_of(
        &self,
        mut r: pb::DeleteEnvironmentRequest,
    ) -> Result<(), Status> {
        for (field, value) in [("project", &r.project), ("environment", &r.environment)] {
            if value.is_empty() {
                return Err(super::status::required(field));
            }
        }
        let request_id = std::mem::take(&mut r.request_id);
        idempotency::once(
            &self.app.store,
            "DeleteEnvironment",
            request_id,
            &r,
            || async {
                self.app
                    .store
                    .delete_environment(&r.project, &r.environment)
                    .await
                    .map_err(Error::from)?;
                Ok(())
            },
        )
        .await?;
        Ok(())
    }
}
