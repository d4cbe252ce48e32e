//! Fakes of the orchestrator's seams, for tests that need no git repository and no daemon.
#![allow(dead_code)]

use futures::future::BoxFuture;
use futures::FutureExt;
use runner::orchestrator::{
    EventTx, ImageRequest, PreparedImage, ServiceImageRequest, Sources, StepImages,
};
use runner::store::Project;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Serves one manifest (and repository properties) for every revision; `rev` resolves to "sha-<rev>".
pub struct FakeSources {
    pub manifest: Value,
    pub properties: Value,
}

impl Sources for FakeSources {
    fn resolve<'a>(
        &'a self,
        _: &'a Project,
        rev: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<String>> {
        async move { Ok(format!("sha-{rev}")) }.boxed()
    }
    fn read_file<'a>(
        &'a self,
        _: &'a Project,
        _: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<Option<Vec<u8>>>> {
        let found =
            (path == ".opschain/actions.json").then(|| self.manifest.to_string().into_bytes());
        async move { Ok(found) }.boxed()
    }
    fn repository_properties<'a>(
        &'a self,
        _: &'a Project,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, runner::error::Result<Value>> {
        async move { Ok(self.properties.clone()) }.boxed()
    }
}

/// Names images after what they are for; a service build whose Dockerfile path contains "missing" fails.
pub struct FakeImages;

impl StepImages for FakeImages {
    fn prepare<'a>(
        &'a self,
        request: ImageRequest<'a>,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        let image = format!("fake:{}", request.identity.action);
        async move {
            Ok(PreparedImage {
                image,
                cached: false,
            })
        }
        .boxed()
    }

    fn prepare_service<'a>(
        &'a self,
        request: ServiceImageRequest<'a>,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        let dockerfile = request.build.dockerfile().to_owned();
        let image = format!("fake-service:{}", request.service);
        async move {
            if dockerfile.contains("missing") {
                return Err(runner::error::Error::Build {
                    message: format!("{dockerfile} does not exist"),
                });
            }
            Ok(PreparedImage {
                image,
                cached: false,
            })
        }
        .boxed()
    }

    fn prepare_docker_daemon<'a>(
        &'a self,
        _: &'a str,
        _: EventTx,
        _: CancellationToken,
    ) -> BoxFuture<'a, runner::error::Result<PreparedImage>> {
        async move {
            Ok(PreparedImage {
                image: "fake-dind".into(),
                cached: true,
            })
        }
        .boxed()
    }
}
