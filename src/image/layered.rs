//! Base runner images layered onto an image the user already has (`runner image build-base --from IMAGE`): Debian,
//! AlmaLinux, Alpine, a company's hardened image. The runner adds only its in-container parts (the static agent as
//! the entrypoint, `opschain-exec`, `opschain-properties`, `/opt/opschain` owned by the image's user) with the
//! Engine's BuildKit; nothing is pulled.
//!
//! Before building, the source's shell is run once in a throwaway, labelled container with no network. Reading the
//! image's files (through BuildKit or the archive API) could only say that *something* is at `/bin/sh`; running
//! it also proves it starts (its loader, libraries and architecture are there), that it is a POSIX shell
//! (arithmetic expansion), and tells the numeric uid:gid the image's `USER` runs as — which `/opt/opschain` must
//! belong to for the agent to work under it — without needing `id` or `/etc/passwd` in the image.

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListImagesOptions, LogsOptions, RemoveContainerOptions,
    RemoveImageOptions, TagImageOptions, WaitContainerOptions,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::rootfs::{
    is_static, stage_file, stage_link, OfflineImage, OfflineImageError, CONTENT_KEY_LABEL,
};
use crate::buildkit::{self, BuildProgress, BuildRequest, DockerEndpoint};
use crate::executor::{LABEL_CHANGE, LABEL_OWNER, LABEL_STEP, LABEL_STORE};

/// The Dockerfile of a layered base image, compiled in.
pub const DOCKERFILE: &str = include_str!("../../runner-image/layered/Dockerfile");

/// The image a base runner image was built from, as the user named it (`scratch` for the offline default).
pub const FROM_LABEL: &str = "runner.base.from";
/// The image ID of that source, which is what the build used.
pub const FROM_ID_LABEL: &str = "runner.base.from-id";
/// The numeric `uid:gid` the image's steps run as (and own `/opt/opschain`).
pub const USER_LABEL: &str = "runner.base.user";

/// Where a source image is pinned by its ID for the build (BuildKit resolves `FROM` by name in the Engine's store,
/// and a name the user can move must not change what is built).
const PIN_REPOSITORY: &str = "runner-base-from";

const AGENT_FIX: &str = "build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p runner-agent --release --target x86_64-unknown-linux-gnu` (tools/setup.sh does) or point RUNNER_AGENT_BIN at it";

/// Run by the source's `/bin/sh` before building: a POSIX arithmetic expansion, then the uid and gid of the
/// process (the image's `USER`) read from /proc with shell builtins only.
const PROBE: &str =
    "u=; g=; while read -r k v _; do case \"$k\" in Uid:) u=$v;; Gid:) g=$v;; esac; \
                     done </proc/self/status; echo \"runner-probe $((6*7)) $u:$g\"";

/// How long the probe may take (an image's shell answers in milliseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// What `build-base --from` builds.
#[derive(Debug, Clone)]
pub struct LayeredRequest {
    /// The source image, as the user named it (a name[:tag] or an image ID) — local only.
    pub from: String,
    /// The name to tag the result with; `None` derives one from `from` ([`default_tag`]).
    pub tag: Option<String>,
    /// The static in-container agent.
    pub agent: PathBuf,
}

/// Who runs the probe container: the labels the reaper finds it by if this process dies meanwhile.
#[derive(Debug, Clone)]
pub struct ProbeOwner {
    pub owner: String,
    pub store: String,
}

/// A source image as the Engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    /// `sha256:…`
    pub id: String,
}

/// `runner/opschain-runner-<name>:<tag>` for a source `…/<name>:<tag>` (`latest` when it has no tag); for an image
/// ID, `runner/opschain-runner-<first 12 hex digits>:latest`.
pub fn default_tag(from: &str) -> String {
    let id = from.strip_prefix("sha256:").unwrap_or(from);
    if id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit()) && !from.contains('/') {
        return format!("runner/opschain-runner-{}:latest", &id[..12].to_lowercase());
    }
    let without_digest = from.split('@').next().unwrap_or(from);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let (name, tag) = match last.split_once(':') {
        Some((name, tag)) => (name, tag),
        None => (last, "latest"),
    };
    let clean = |s: &str, extra: &[char]| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || extra.contains(&c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!(
        "runner/opschain-runner-{}:{}",
        clean(&name.to_lowercase(), &['.', '_', '-']),
        clean(tag, &['.', '_', '-'])
    )
}

/// Whether `reference` is a `name[:tag]` the Engine accepts as a tag: lowercase path components of letters and
/// digits joined by `.`, `_` or `-` (an optional `host[:port]/` first), and a tag of up to 128 `[A-Za-z0-9_.-]`.
pub fn valid_reference(reference: &str) -> bool {
    let (name, tag) = match reference.rsplit_once(':') {
        // A colon before the last `/` is a registry port, not a tag.
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (reference, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    });
    let mut components = name.split('/').peekable();
    let mut first = true;
    let mut ok = !name.is_empty();
    while let Some(component) = components.next() {
        let is_host = first && components.peek().is_some() && component.contains(['.', ':']);
        first = false;
        let valid = if is_host {
            let (host, port) = component.split_once(':').unwrap_or((component, "0"));
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                && !port.is_empty()
                && port.chars().all(|c| c.is_ascii_digit())
        } else {
            !component.is_empty()
                && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && component.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        };
        ok &= valid;
    }
    ok && tag_ok
}

/// The source image, or an error saying how to get it (nothing is pulled).
pub async fn inspect_source(
    docker: &bollard::Docker,
    from: &str,
) -> Result<SourceImage, OfflineImageError> {
    match docker.inspect_image(from).await {
        Ok(image) => Ok(SourceImage {
            id: image.id.unwrap_or_default(),
        }),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Err(OfflineImageError::SourceMissing {
            image: from.to_owned(),
        }),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 400,
            message,
        }) => Err(OfflineImageError::InvalidReference {
            what: "--from",
            reference: from.to_owned(),
            message,
        }),
        Err(e) => Err(OfflineImageError::Docker(e.to_string())),
    }
}

/// What the probe found out about the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellProbe {
    /// `uid:gid` of the image's `USER`.
    pub user: String,
}

/// Runs the source's `/bin/sh` once in a throwaway container (labelled, no network, removed whatever happens).
pub async fn probe_shell(
    docker: &bollard::Docker,
    source: &SourceImage,
    from: &str,
    owner: &ProbeOwner,
) -> Result<ShellProbe, OfflineImageError> {
    let name = format!("runner-base-probe-{}", uuid::Uuid::new_v4());
    let body = ContainerCreateBody {
        image: Some(source.id.clone()),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), PROBE.into()]),
        cmd: Some(vec![]),
        labels: Some(HashMap::from([
            (LABEL_OWNER.to_owned(), owner.owner.clone()),
            (LABEL_STORE.to_owned(), owner.store.clone()),
            (LABEL_CHANGE.to_owned(), String::new()),
            (LABEL_STEP.to_owned(), name.clone()),
        ])),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| OfflineImageError::Docker(e.to_string()))?;
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, run_probe(docker, &created.id)).await;
    let removed = docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await;
    let no_shell = |detail: String| OfflineImageError::NoShell {
        image: from.to_owned(),
        detail,
    };
    let (code, output) = match outcome {
        Err(_) => {
            return Err(no_shell(format!(
                "/bin/sh -c did not finish within {} s",
                PROBE_TIMEOUT.as_secs()
            )))
        }
        Ok(Err(ProbeFailure::Start(message))) => return Err(no_shell(message)),
        Ok(Err(ProbeFailure::Docker(message))) => return Err(OfflineImageError::Docker(message)),
        Ok(Ok(ran)) => ran,
    };
    if let Err(e) = removed {
        if !matches!(
            e,
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }
        ) {
            return Err(OfflineImageError::Docker(e.to_string()));
        }
    }
    parse_probe(code, &output).map_err(no_shell)
}

enum ProbeFailure {
    /// The shell did not start: the runtime's message.
    Start(String),
    Docker(String),
}

async fn run_probe(docker: &bollard::Docker, id: &str) -> Result<(i64, String), ProbeFailure> {
    docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { message, .. } => {
                ProbeFailure::Start(message)
            }
            other => ProbeFailure::Docker(other.to_string()),
        })?;
    let mut code = 0;
    let mut waits = docker.wait_container(id, None::<WaitContainerOptions>);
    while let Some(waited) = waits.next().await {
        match waited {
            Ok(response) => code = response.status_code,
            // bollard reports a non-zero exit as an error carrying the code.
            Err(bollard::errors::Error::DockerContainerWaitError { code: c, .. }) => code = c,
            Err(e) => return Err(ProbeFailure::Docker(e.to_string())),
        }
    }
    let mut output = String::new();
    let mut logs = docker.logs(
        id,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    while let Some(chunk) = logs.next().await {
        match chunk {
            Ok(chunk) => output.push_str(&String::from_utf8_lossy(&chunk.into_bytes())),
            Err(e) => return Err(ProbeFailure::Docker(e.to_string())),
        }
    }
    Ok((code, output))
}

/// The probe's answer, or why the image's `/bin/sh` is not a POSIX shell the runner can use.
pub fn parse_probe(code: i64, output: &str) -> Result<ShellProbe, String> {
    let excerpt = || {
        let text = output.trim();
        match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_owned(),
        }
    };
    if code != 0 {
        return Err(format!("/bin/sh -c exited with code {code}: {}", excerpt()));
    }
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("runner-probe "))
        .ok_or_else(|| format!("/bin/sh -c printed something else: {}", excerpt()))?;
    let (sum, user) = line.split_once(' ').unwrap_or((line, ""));
    if sum != "42" {
        return Err(format!(
            "/bin/sh does not do POSIX arithmetic expansion ($((6*7)) gave {sum:?})"
        ));
    }
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    match user.split_once(':') {
        Some((uid, gid)) if numeric(uid) && numeric(gid) => Ok(ShellProbe {
            user: user.to_owned(),
        }),
        _ => Err(format!(
            "/proc/self/status gave no numeric Uid/Gid (got {user:?})"
        )),
    }
}

/// Stages the build directory (Dockerfile, the agent and its two links, an empty /opt/opschain) under `dir` and
/// returns the content key of every input: the Dockerfile, the source's image ID and the agent's bytes.
pub fn stage(agent: &Path, source: &SourceImage, dir: &Path) -> Result<String, OfflineImageError> {
    if !agent.exists() {
        return Err(OfflineImageError::MissingInput {
            what: "the static in-container agent",
            path: agent.to_owned(),
            fix: AGENT_FIX,
        });
    }
    if !is_static(agent) {
        return Err(OfflineImageError::NotStatic {
            path: agent.to_owned(),
            fix: AGENT_FIX,
        });
    }
    let stage_err = |path: &Path| {
        let path = path.to_owned();
        move |source| OfflineImageError::Stage { path, source }
    };
    let mut key = Sha256::new();
    key.update(DOCKERFILE.as_bytes());
    key.update(source.id.as_bytes());
    let staged = dir.join("runner/usr/bin/opschain-agent");
    stage_file(agent, &staged, 0o755).map_err(stage_err(&staged))?;
    key.update(std::fs::read(&staged).map_err(stage_err(&staged))?);
    for tool in ["opschain-exec", "opschain-properties"] {
        let link = dir.join("runner/usr/bin").join(tool);
        stage_link("opschain-agent", &link).map_err(stage_err(&link))?;
        key.update(tool.as_bytes());
    }
    let opt = dir.join("runner/opt/opschain");
    std::fs::create_dir_all(&opt).map_err(stage_err(&opt))?;
    let dockerfile = dir.join("Dockerfile");
    if std::fs::read_to_string(&dockerfile).ok().as_deref() != Some(DOCKERFILE) {
        std::fs::write(&dockerfile, DOCKERFILE).map_err(stage_err(&dockerfile))?;
    }
    Ok(hex::encode(key.finalize()))
}

/// Builds (or finds up to date) a base runner image layered onto `request.from`.
pub async fn build_layered(
    home: &Path,
    endpoint: &DockerEndpoint,
    docker: &bollard::Docker,
    request: &LayeredRequest,
    owner: &ProbeOwner,
    progress: UnboundedSender<BuildProgress>,
    cancel: CancellationToken,
) -> Result<OfflineImage, OfflineImageError> {
    let reference = request
        .tag
        .clone()
        .unwrap_or_else(|| default_tag(&request.from));
    if !valid_reference(&reference) {
        return Err(OfflineImageError::InvalidReference {
            what: "--tag",
            reference,
            message:
                "use NAME[:TAG] with a lowercase name (e.g. runner/opschain-runner-debian:bookworm)"
                    .into(),
        });
    }
    let source = inspect_source(docker, &request.from).await?;
    let hex_id = source.id.trim_start_matches("sha256:").to_owned();
    let dir = crate::cache::base_images(home).join(&hex_id[..hex_id.len().min(32)]);
    let key = stage(&request.agent, &source, &dir)?;
    if let Some(found) = up_to_date(docker, &reference, &key).await? {
        return Ok(found);
    }
    let probe = probe_shell(docker, &source, &request.from, owner).await?;
    let pin = format!("{PIN_REPOSITORY}:{hex_id}");
    docker
        .tag_image(
            &source.id,
            Some(TagImageOptions {
                repo: Some(PIN_REPOSITORY.to_owned()),
                tag: Some(hex_id.clone()),
            }),
        )
        .await
        .map_err(|e| OfflineImageError::Docker(e.to_string()))?;
    let build = BuildRequest {
        context_dir: buildkit::LocalDir::Own(dir.clone()),
        dockerfile_dir: buildkit::LocalDir::Own(dir.clone()),
        dockerfile_name: "Dockerfile".into(),
        build_args: BTreeMap::from([
            ("RUNNER_FROM".to_owned(), pin.clone()),
            ("RUNNER_USER".to_owned(), probe.user.clone()),
        ]),
        labels: BTreeMap::from([
            (CONTENT_KEY_LABEL.to_owned(), key.clone()),
            (FROM_LABEL.to_owned(), request.from.clone()),
            (FROM_ID_LABEL.to_owned(), source.id.clone()),
            (USER_LABEL.to_owned(), probe.user.clone()),
        ]),
        tags: vec![reference.clone()],
        ..Default::default()
    };
    let built = buildkit::build(endpoint, build, progress, cancel).await;
    unpin(docker, &source.id, &pin).await;
    let built = built.map_err(|source| OfflineImageError::Build {
        reference: reference.clone(),
        source,
    })?;
    Ok(OfflineImage {
        reference,
        image_id: built.image_id,
        built: true,
    })
}

/// The image at `reference` if it carries `key`.
async fn up_to_date(
    docker: &bollard::Docker,
    reference: &str,
    key: &str,
) -> Result<Option<OfflineImage>, OfflineImageError> {
    match docker.inspect_image(reference).await {
        Ok(image) => {
            let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
            Ok(
                (labels.get(CONTENT_KEY_LABEL).map(String::as_str) == Some(key)).then(|| {
                    OfflineImage {
                        reference: reference.to_owned(),
                        image_id: image.id.unwrap_or_default(),
                        built: false,
                    }
                }),
            )
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(OfflineImageError::Docker(e.to_string())),
    }
}

/// Drops the pin tag unless it is the source's only name (removing it then would delete the user's image).
async fn unpin(docker: &bollard::Docker, source_id: &str, pin: &str) {
    let Ok(image) = docker.inspect_image(source_id).await else {
        return;
    };
    let others = image
        .repo_tags
        .unwrap_or_default()
        .iter()
        .filter(|t| t.as_str() != pin)
        .count();
    if others > 0 {
        let _ = docker
            .remove_image(
                pin,
                Some(RemoveImageOptions {
                    noprune: true,
                    ..Default::default()
                }),
                None,
            )
            .await;
    }
}

/// A base runner image the runner built, as `runner image list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BaseImageEntry {
    /// Its names (`name:tag`).
    pub names: Vec<String>,
    /// What it was built from (`scratch` for the offline default).
    pub from: String,
    /// The source's image ID, when built with `--from`.
    pub from_id: Option<String>,
    /// Its own image ID (`sha256:…`).
    pub id: String,
    pub size_bytes: i64,
    /// Unix seconds.
    pub created: i64,
}

/// Every base runner image in the Engine (the offline default and those built `--from`), newest first.
pub async fn list(docker: &bollard::Docker) -> Result<Vec<BaseImageEntry>, OfflineImageError> {
    let images = docker
        .list_images(Some(ListImagesOptions {
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![FROM_LABEL.to_owned()],
            )])),
            ..Default::default()
        }))
        .await
        .map_err(|e| OfflineImageError::Docker(e.to_string()))?;
    let mut entries: Vec<BaseImageEntry> = images
        .into_iter()
        .map(|image| BaseImageEntry {
            names: image
                .repo_tags
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect(),
            from: image.labels.get(FROM_LABEL).cloned().unwrap_or_default(),
            from_id: image.labels.get(FROM_ID_LABEL).cloned(),
            id: image.id,
            size_bytes: image.size,
            created: image.created,
        })
        .collect();
    entries.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tags_name_the_source() {
        assert_eq!(
            default_tag("debian:bookworm-slim"),
            "runner/opschain-runner-debian:bookworm-slim"
        );
        assert_eq!(
            default_tag("registry.example.com:5000/team/AlmaLinux"),
            "runner/opschain-runner-almalinux:latest"
        );
        assert_eq!(
            default_tag("sha256:0123456789abcdef0123"),
            "runner/opschain-runner-0123456789ab:latest"
        );
        for from in [
            "debian:bookworm-slim",
            "a/b/c:1.0",
            "sha256:0123456789abcdef",
            "x@sha256:00",
        ] {
            assert!(valid_reference(&default_tag(from)), "{from}");
        }
    }

    #[test]
    fn references_are_checked_like_the_engine_does() {
        for good in [
            "runner/base:1",
            "debian",
            "localhost:5000/team/img:v1.2_3",
            "a.b-c_d",
            "registry.example.com/e",
        ] {
            assert!(valid_reference(good), "{good}");
        }
        for bad in [
            "",
            "Runner/base:1",
            "runner/base:",
            "runner//base",
            "runner/base:-x",
            "runner/-base",
            "runner base",
            "runner/base:a/b",
            "a.b-c_d/e",
        ] {
            assert!(!valid_reference(bad), "{bad}");
        }
    }

    #[test]
    fn the_probe_answer_gives_the_user_or_says_what_is_wrong() {
        assert_eq!(
            parse_probe(0, "runner-probe 42 1000:1000\n").unwrap().user,
            "1000:1000"
        );
        let err = parse_probe(127, "/bin/sh: not found").unwrap_err();
        assert!(
            err.contains("exited with code 127") && err.contains("not found"),
            "{err}"
        );
        let err = parse_probe(0, "runner-probe $((6*7)) 0:0").unwrap_err();
        assert!(err.contains("arithmetic"), "{err}");
        let err = parse_probe(0, "runner-probe 42 :").unwrap_err();
        assert!(err.contains("Uid/Gid"), "{err}");
        let err = parse_probe(0, "hello").unwrap_err();
        assert!(err.contains("printed something else: hello"), "{err}");
    }

    #[test]
    fn the_content_key_follows_the_source_and_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let agent = crate::image::agent::locate(dir.path());
        if !agent.exists() {
            // Missing agents are reported (below); tools/setup.sh builds it for CI.
            let err = stage(
                &agent,
                &SourceImage {
                    id: "sha256:a".into(),
                },
                dir.path(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("the static in-container agent not found"),
                "{err}"
            );
            return;
        }
        let a = SourceImage {
            id: "sha256:a".into(),
        };
        let b = SourceImage {
            id: "sha256:b".into(),
        };
        let key_a = stage(&agent, &a, dir.path()).unwrap();
        assert_eq!(key_a, stage(&agent, &a, dir.path()).unwrap());
        assert_ne!(key_a, stage(&agent, &b, dir.path()).unwrap());
        assert!(dir.path().join("runner/opt/opschain").is_dir());
        assert_eq!(
            std::fs::read_link(dir.path().join("runner/usr/bin/opschain-exec")).unwrap(),
            Path::new("opschain-agent")
        );
        let not_static = stage(Path::new("/usr/bin/git"), &a, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            not_static.contains("is not a static binary"),
            "{not_static}"
        );
    }
}
