//! Step images: built from the change's commit with the repository's or the default Dockerfile, tagged by a
//! content key so a step whose inputs did not change reuses the image without asking BuildKit anything, and
//! single-flighted so parallel steps needing one image run one build.

use futures::future::BoxFuture;
use futures::FutureExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{Mutex, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::buildkit::{self, BuildError, BuildProgress, BuildRequest, DockerEndpoint, LocalDir};
use crate::context::{self, ContextInputs};
use crate::error::{Error, Result};
use crate::events::{BuildStatus, Event};
use crate::orchestrator::{
    step_context, EventTx, ImageRequest, PreparedImage, ServiceImageRequest, StepImages,
};
use crate::snapshot::{on_mirror, repo_tar, repo_tree, PathError, SnapshotDir};

/// The image repository step images are tagged into.
pub const STEP_IMAGE_REPOSITORY: &str = "runner-step";
/// The image repository service images built from a repository are tagged into.
pub const SERVICE_IMAGE_REPOSITORY: &str = "runner-service";

/// Identifies a step image by everything that goes into it.
pub fn content_key(
    dockerfile: &[u8],
    git_sha: &str,
    step_context_env: &[u8],
    build_args: &BTreeMap<String, String>,
    base_image_id: &str,
) -> String {
    let mut hash = Sha256::new();
    for part in [
        dockerfile,
        git_sha.as_bytes(),
        step_context_env,
        base_image_id.as_bytes(),
    ] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    for (key, value) in build_args {
        hash.update((key.len() as u64).to_le_bytes());
        hash.update(key);
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value);
    }
    hex::encode(hash.finalize())
}

type Shared = Arc<OnceCell<std::result::Result<String, String>>>;

/// Runs at most one build per content key at a time; callers asking for a key being built wait for that build.
#[derive(Default)]
pub struct SingleFlight {
    inflight: Mutex<HashMap<String, Shared>>,
}

impl SingleFlight {
    /// The result of `build` for `key`, shared with concurrent callers of the same key.
    pub async fn run<F>(&self, key: &str, build: F) -> std::result::Result<String, String>
    where
        F: std::future::Future<Output = std::result::Result<String, String>>,
    {
        let cell = self
            .inflight
            .lock()
            .await
            .entry(key.to_owned())
            .or_default()
            .clone();
        let result = cell.get_or_init(|| build).await.clone();
        self.inflight.lock().await.remove(key);
        result
    }
}

/// A base runner image as a step's build uses it.
struct Base {
    reference: String,
    id: String,
    /// The numeric `uid:gid` its steps run as.
    user: String,
}

/// Builds step images with the daemon's BuildKit.
pub struct BuildKitImages {
    home: PathBuf,
    endpoint: DockerEndpoint,
    docker: bollard::Docker,
    base_image: String,
    flights: SingleFlight,
    /// Whether this process made sure the dind image matches this machine's docker.io.
    dind_checked: Mutex<bool>,
}

impl BuildKitImages {
    pub fn new(
        home: PathBuf,
        endpoint: DockerEndpoint,
        docker: bollard::Docker,
        base_image: String,
    ) -> BuildKitImages {
        BuildKitImages {
            home,
            endpoint,
            docker,
            base_image,
            flights: SingleFlight::default(),
            dind_checked: Mutex::new(false),
        }
    }

    /// The base image steps build `FROM`: the project's or environment's setting, else the operator's default.
    async fn base(&self, setting: Option<&str>) -> Option<Base> {
        let reference = setting.unwrap_or(&self.base_image).to_owned();
        let image = self.docker.inspect_image(&reference).await.ok()?;
        let user = image
            .config
            .and_then(|c| c.labels)
            .and_then(|mut l| l.remove(crate::image::layered::USER_LABEL))
            .unwrap_or_else(|| "0:0".to_owned());
        Some(Base {
            reference,
            id: image.id?,
            user,
        })
    }

    async fn image_id(&self, reference: &str) -> Option<String> {
        self.docker
            .inspect_image(reference)
            .await
            .ok()
            .and_then(|i| i.id)
    }

    async fn prepare_inner(
        &self,
        request: ImageRequest<'_>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> Result<PreparedImage> {
        let id = request.identity;
        let (home, sha) = (self.home.clone(), id.change.git_sha.clone());
        let (tar, dockerfile) = on_mirror(&self.home, id.project, move |mirror| {
            let tar = repo_tar(mirror, &sha, &crate::cache::repo_tars(&home))?;
            let dockerfile = mirror.read_file(&sha, context::REPOSITORY_DOCKERFILE)?;
            Ok((tar, dockerfile))
        })
        .await?;
        let base =
            self.base(request.base_image)
                .await
                .ok_or_else(|| BuildError::BaseImageMissing {
                    message: format!(
                        "{} does not exist",
                        request.base_image.unwrap_or(&self.base_image)
                    ),
                })?;
        let mut values = step_context::context_values(&id);
        if let Some(map) = values.as_object_mut() {
            // Only what the image depends on: a change's steps, and later changes at the same commit with the same
            // properties, share one image (no step, user, change id or action in what it is built from).
            map.remove("step");
            map.remove("user");
            if let Some(change) = map.get_mut("change").and_then(|c| c.as_object_mut()) {
                change.remove("id");
                change.remove("action");
            }
        }
        let plan = context::plan(&ContextInputs {
            repository_dockerfile: dockerfile.as_deref(),
            properties: request.properties,
            context: &values,
            git_rev: &id.change.git_rev,
            git_sha: &id.change.git_sha,
            base_runner: &base.reference,
            runner_user: &base.user,
        })?;
        let key = content_key(
            &plan.dockerfile,
            &id.change.git_sha,
            &plan.step_context_env,
            &plan.build_args,
            &base.id,
        );
        let reference = format!("{STEP_IMAGE_REPOSITORY}:{}", &key[..32]);
        if self.image_id(&reference).await.is_some() {
            return Ok(PreparedImage {
                image: reference,
                cached: true,
            });
        }
        let secrets = BTreeMap::from([(
            "opschain-build-env".to_owned(),
            request.build_secrets.to_env_file(),
        )]);
        let tar = {
            let user = base.user.clone();
            tokio::task::spawn_blocking(move || context::repo_tar_for_user(&tar, &user))
                .await
                .expect("re-owning a tar does not panic")?
        };
        let dir = crate::cache::contexts(&self.home).join(&key[..32]);
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1);
        let written = context::write(&plan, &tar, &dir, mtime)?;
        let request = BuildRequest {
            context_dir: written.context_dir.clone().into(),
            dockerfile_dir: written.dockerfile_dir.clone().into(),
            dockerfile_name: "Dockerfile".into(),
            build_args: plan.build_args.clone(),
            labels: BTreeMap::from([("runner.content-key".to_owned(), key.clone())]),
            tags: vec![reference],
            secrets,
        };
        self.build_once(&key, request, id.step_id, events, cancel)
            .await
    }
}

/// Turns BuildKit's progress into the step's build events, until the sender is dropped.
fn forward_progress(
    step_id: String,
    events: EventTx,
) -> (
    tokio::sync::mpsc::UnboundedSender<BuildProgress>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<BuildProgress>();
    let forward = tokio::spawn(async move {
        while let Some(progress) = rx.recv().await {
            let event = match progress {
                BuildProgress::VertexStarted { name, .. } => Event::Build {
                    step_id: step_id.clone(),
                    vertex: name,
                    status: BuildStatus::Started,
                },
                BuildProgress::VertexCompleted {
                    name,
                    cached,
                    error,
                    ..
                } => {
                    let status = match (error, cached) {
                        (Some(_), _) => BuildStatus::Failed,
                        (None, true) => BuildStatus::Cached,
                        (None, false) => BuildStatus::Completed,
                    };
                    Event::Build {
                        step_id: step_id.clone(),
                        vertex: name,
                        status,
                    }
                }
                BuildProgress::Log { line, .. } => Event::Log {
                    step_id: step_id.clone(),
                    stream: crate::executor::Stream::Stderr,
                    line: format!("build: {line}"),
                },
            };
            let _ = events.send(event);
        }
    });
    (tx, forward)
}

impl BuildKitImages {
    async fn prepare_service_inner(
        &self,
        request: ServiceImageRequest<'_>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> Result<PreparedImage> {
        let id = request.identity;
        let (home, sha) = (self.home.clone(), id.change.git_sha.clone());
        let tree = on_mirror(&self.home, id.project, move |mirror| {
            repo_tree(
                mirror,
                &sha,
                &crate::cache::repo_tars(&home),
                &crate::cache::repo_trees(&home),
            )
        })
        .await?;
        let build = request.build;
        // Both paths come from the repository: resolved beneath the snapshot, never through a symlink out of it.
        let snapshot = SnapshotDir::open(&tree)?;
        let at_commit = |e: PathError| match e {
            PathError::Missing { path, .. } => Error::Build {
                message: format!(
                    "{path} does not exist at commit {}: add it, or fix the service's `build`",
                    id.change.git_sha
                ),
            },
            other => other.into(),
        };
        let dockerfile = snapshot
            .read("build Dockerfile", build.dockerfile())
            .map_err(at_commit)?;
        snapshot
            .dir("build context", build.context())
            .map_err(at_commit)?;
        let base = self.base(request.base_image).await.unwrap_or_else(|| Base {
            reference: request.base_image.unwrap_or(&self.base_image).to_owned(),
            id: String::new(),
            user: "0:0".to_owned(),
        });
        let build_args = context::build_args(
            &id.change.git_rev,
            &id.change.git_sha,
            &base.reference,
            &base.user,
        );
        let key = content_key(
            &dockerfile,
            &id.change.git_sha,
            format!("service context {}", build.context()).as_bytes(),
            &build_args,
            &base.id,
        );
        let reference = format!("{SERVICE_IMAGE_REPOSITORY}:{}", &key[..32]);
        if self.image_id(&reference).await.is_some() {
            return Ok(PreparedImage {
                image: reference,
                cached: true,
            });
        }
        // The Dockerfile is served from a directory of ours holding only the bytes read above.
        let dockerfile_dir = self
            .home
            .join("cache/contexts")
            .join(&key[..32])
            .join("dockerfile");
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1);
        context::write_dockerfile(&dockerfile_dir, &dockerfile, mtime)?;
        let request = BuildRequest {
            context_dir: LocalDir::Beneath {
                root: tree,
                path: build.context().to_owned(),
                what: "build context",
            },
            dockerfile_dir: LocalDir::Own(dockerfile_dir),
            dockerfile_name: "Dockerfile".into(),
            build_args,
            labels: BTreeMap::from([("runner.content-key".to_owned(), key.clone())]),
            tags: vec![reference],
            secrets: BTreeMap::new(),
        };
        self.build_once(&key, request, id.step_id, events, cancel)
            .await
    }

    /// Runs `request` (which tags one image) unless a build of `key` is under way, then shares that build's result.
    async fn build_once(
        &self,
        key: &str,
        request: BuildRequest,
        step_id: &str,
        events: EventTx,
        cancel: CancellationToken,
    ) -> Result<PreparedImage> {
        let reference = request.tags[0].clone();
        let (tx, forward) = forward_progress(step_id.to_owned(), events);
        let build = async {
            let built = buildkit::build(&self.endpoint, request, tx, cancel).await;
            let _ = forward.await;
            built
                .map(|_| reference)
                .map_err(|e| crate::error::error_text(&e))
        };
        let image = self
            .flights
            .run(key, build)
            .await
            .map_err(|message| Error::Build { message })?;
        Ok(PreparedImage {
            image,
            cached: false,
        })
    }

    async fn prepare_docker_daemon_inner(
        &self,
        step_id: &str,
        events: EventTx,
        cancel: CancellationToken,
    ) -> Result<PreparedImage> {
        let reference = crate::image::dind::reference();
        if *self.dind_checked.lock().await && self.image_id(&reference).await.is_some() {
            return Ok(PreparedImage {
                image: reference,
                cached: true,
            });
        }
        let (tx, forward) = forward_progress(step_id.to_owned(), events);
        let build = async {
            let built = crate::image::dind::build_dind(
                &self.home,
                &self.endpoint,
                &self.docker,
                &crate::image::base::BaseImageInputs::from_env(&self.home).busybox,
                &reference,
                tx,
                cancel,
            )
            .await;
            let _ = forward.await;
            built
                .map(|image| image.reference)
                .map_err(|e| crate::error::error_text(&e))
        };
        let image = self
            .flights
            .run("docker-daemon", build)
            .await
            .map_err(|message| Error::Build { message })?;
        // Its inputs are this machine's docker.io: checked once per process, not on every step.
        *self.dind_checked.lock().await = true;
        Ok(PreparedImage {
            image,
            cached: false,
        })
    }
}

impl StepImages for BuildKitImages {
    fn prepare_service<'a>(
        &'a self,
        request: ServiceImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>> {
        self.prepare_service_inner(request, events, cancel).boxed()
    }

    fn prepare_docker_daemon<'a>(
        &'a self,
        step_id: &'a str,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>> {
        self.prepare_docker_daemon_inner(step_id, events, cancel)
            .boxed()
    }

    fn prepare<'a>(
        &'a self,
        request: ImageRequest<'a>,
        events: EventTx,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<PreparedImage>> {
        self.prepare_inner(request, events, cancel).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn content_key_changes_with_every_input() {
        let args = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let base = content_key(b"FROM x", "sha", b"{}", &args, "img");
        assert_eq!(base, content_key(b"FROM x", "sha", b"{}", &args, "img"));
        let other_args = BTreeMap::from([("A".to_owned(), "2".to_owned())]);
        for changed in [
            content_key(b"FROM y", "sha", b"{}", &args, "img"),
            content_key(b"FROM x", "sha2", b"{}", &args, "img"),
            content_key(b"FROM x", "sha", b"{ }", &args, "img"),
            content_key(b"FROM x", "sha", b"{}", &other_args, "img"),
            content_key(b"FROM x", "sha", b"{}", &args, "img2"),
            // Boundaries are part of the key: moving bytes between fields changes it.
            content_key(b"FROM xs", "ha", b"{}", &args, "img"),
        ] {
            assert_ne!(changed, base);
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_build() {
        let flights = Arc::new(SingleFlight::default());
        let builds = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..5)
            .map(|_| {
                let (flights, builds) = (flights.clone(), builds.clone());
                tokio::spawn(async move {
                    flights
                        .run("k", async {
                            builds.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok("image".to_owned())
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap(), "image");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        // Once done, the key can be built again (e.g. after the image was removed).
        flights
            .run("k", async {
                builds.fetch_add(1, Ordering::SeqCst);
                Ok("again".into())
            })
            .await
            .unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }
}
