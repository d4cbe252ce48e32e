//! What runs beside a step: its services with their images ready (those with `build` built from the change's
//! commit), and its Docker access (for `docker: dind`, the daemon's image built offline on first use).

use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

use super::{EventTx, Orchestrator, ServiceImageRequest, StepIdentity};
use crate::actions::{Action, DockerAccess, Service};
use crate::error::{Error, Result};
use crate::executor::StepDocker;

/// A step's services and Docker access, ready for the executor.
pub(crate) struct Beside {
    pub services: BTreeMap<String, Service>,
    pub docker: Option<StepDocker>,
}

impl Orchestrator {
    /// Builds what the action's services and Docker access need; an error names the service that failed.
    pub(crate) async fn prepare_beside(
        &self,
        identity: StepIdentity<'_>,
        base_image: Option<&str>,
        action: &Action,
        events: &EventTx,
        cancel: &CancellationToken,
    ) -> Result<Beside> {
        let mut services = action.services.clone();
        for (name, service) in services.iter_mut() {
            let Some(build) = &service.build else {
                continue;
            };
            let request = ServiceImageRequest {
                identity,
                service: name,
                build,
                base_image,
            };
            let image = self
                .images
                .prepare_service(request, events.clone(), cancel.clone())
                .await
                .map_err(|e| Error::Build {
                    message: format!(
                        "failed to build the image of service {name:?} from {}: {}",
                        build.dockerfile(),
                        crate::error::error_text(&e)
                    ),
                })?;
            service.image = Some(image.image);
        }
        let docker = match action.docker {
            None => None,
            Some(DockerAccess::Socket) => Some(StepDocker::Socket),
            Some(DockerAccess::Dind) => {
                let image = self
                    .images
                    .prepare_docker_daemon(identity.step_id, events.clone(), cancel.clone())
                    .await
                    .map_err(|e| Error::Build {
                        message: format!(
                            "failed to build the Docker-in-Docker image: {}",
                            crate::error::error_text(&e)
                        ),
                    })?;
                Some(StepDocker::Dind { image: image.image })
            }
        };
        Ok(Beside { services, docker })
    }
}
