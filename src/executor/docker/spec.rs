//! Pure conversion of a step into what the Docker API is sent, and of what it sends back into a result.
//! Tested without a daemon.

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigCgroupnsModeEnum, Mount,
    MountType, NetworkCreateRequest, NetworkingConfig, VolumeCreateRequest,
};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;

use crate::actions::{parse_memory, Readiness, Service, DIND_SERVICE};
use crate::executor::{
    StepDocker, StepRun, LABEL_CHANGE, LABEL_OWNER, LABEL_SERVICE, LABEL_STEP, LABEL_STORE,
    STEP_ROOT,
};

/// Tells the agent to read its envelope (step context, secrets, result marker) from stdin before it runs the action.
pub const STDIN_ENVELOPE: &str = "OPSCHAIN_STDIN_ENVELOPE=1";

/// The step's container: named by the step and the runner that runs it, so a step run again by another worker
/// (its first worker lost, its container maybe still there) never meets the earlier run's name on one daemon.
pub fn container_name(run: &StepRun) -> String {
    format!("runner-step-{}-{}", run.step_id, short(&run.owner))
}

/// The first characters of a runner's id: enough to tell the runners of one step apart.
fn short(owner: &str) -> &str {
    owner.get(..8).unwrap_or(owner)
}

pub fn labels(run: &StepRun) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_OWNER.to_owned(), run.owner.clone()),
        (LABEL_STORE.to_owned(), run.store.clone()),
        (LABEL_CHANGE.to_owned(), run.change_id.clone()),
        (LABEL_STEP.to_owned(), run.step_id.clone()),
    ])
}

/// Where the host's daemon socket appears inside a step with `docker: socket`.
pub const STEP_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The container: the image's own entrypoint (the agent), stdin open for the secrets, nothing secret in `Env`.
/// `host_socket` is the daemon's socket on this host, mounted for `docker: socket`.
pub fn container_body(run: &StepRun, host_socket: &str) -> ContainerCreateBody {
    let socket = run.docker == Some(StepDocker::Socket);
    let dind = matches!(run.docker, Some(StepDocker::Dind { .. }));
    let mut env = vec![STDIN_ENVELOPE.to_owned()];
    if socket {
        env.push(format!("DOCKER_HOST=unix://{STEP_DOCKER_SOCKET}"));
    }
    if dind {
        env.push(format!("DOCKER_HOST=unix://{DIND_SOCKET_DIR}/docker.sock"));
    }
    ContainerCreateBody {
        image: Some(run.image.clone()),
        labels: Some(labels(run)),
        env: Some(env),
        working_dir: Some(STEP_ROOT.to_owned()),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        // Closing our end of the attach closes the process's stdin, so the agent sees EOF after the secrets.
        stdin_once: Some(true),
        tty: Some(false),
        host_config: Some(HostConfig {
            // docker-init as PID 1 forwards SIGTERM to the agent, so a stop is graceful rather than waiting out
            // the grace period (PID 1 ignores signals it has no handler for).
            init: Some(true),
            network_mode: needs_network(run).then(|| network_name(run)),
            binds: socket.then(|| vec![format!("{host_socket}:{STEP_DOCKER_SOCKET}")]),
            mounts: dind.then(|| vec![volume_mount(&dind_volumes(run).socket, DIND_SOCKET_DIR)]),
            ..confined(run.resources.as_ref())
        }),
        ..Default::default()
    }
}

/// The capabilities a step keeps (Docker's default set less `NET_RAW`, `MKNOD`, `AUDIT_WRITE`, `SETFCAP`,
/// `SETPCAP` and `SYS_CHROOT`): enough to install packages, change owners and drop to another user.
pub const STEP_CAPABILITIES: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
];

/// What keeps a step from taking down the host or its neighbours: its memory (no swap on top), CPU and process
/// limits, no privilege gained through setuid binaries, and a reduced capability set.
pub fn confined(resources: Option<&crate::policy::StepResources>) -> HostConfig {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    HostConfig {
        memory: resources.map(|r| clamp(r.memory)),
        memory_swap: resources.map(|r| clamp(r.memory)),
        nano_cpus: resources.map(|r| (r.cpus * 1e9).round() as i64),
        pids_limit: resources.map(|r| clamp(r.pids)),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(STEP_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
        ..Default::default()
    }
}

/// The limit that ended a step: the daemon saw the kernel's OOM killer in its container, or the agent stopped a
/// runaway at the process limit (reported in the result's `exit.limit.pids`).
pub fn limit_hit(
    oom_killed: bool,
    result: Option<&Value>,
    resources: Option<&crate::policy::StepResources>,
) -> Option<crate::executor::LimitHit> {
    use crate::executor::LimitHit;
    if oom_killed {
        return Some(LimitHit::Memory {
            bytes: resources.map(|r| r.memory).unwrap_or_default(),
        });
    }
    let max = result?.pointer("/exit/limit/pids")?;
    Some(LimitHit::Pids {
        max: max
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| max.to_string()),
    })
}

/// A step gets a network of its own when something runs beside it.
pub fn needs_network(run: &StepRun) -> bool {
    !run.services.is_empty() || matches!(run.docker, Some(StepDocker::Dind { .. }))
}

/// Every service container of the step, by name: the action's services and, for `docker: dind`, its daemon.
pub fn service_names(run: &StepRun) -> Vec<String> {
    let mut names: Vec<String> = run.services.keys().cloned().collect();
    if matches!(run.docker, Some(StepDocker::Dind { .. })) {
        names.push(DIND_SERVICE.to_owned());
    }
    names
}

/// The private network a step with services gets: services are reachable by name on it and nothing is published.
pub fn network_name(run: &StepRun) -> String {
    format!("runner-net-{}", run.step_id)
}

pub fn network_body(run: &StepRun) -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: network_name(run),
        driver: Some("bridge".into()),
        labels: Some(labels(run)),
        ..Default::default()
    }
}

pub fn service_container_name(run: &StepRun, service: &str) -> String {
    format!("runner-svc-{}-{}-{service}", run.step_id, short(&run.owner))
}

/// The names a service answers to on the step's network: its own (as in Gitness) and `<ACTION>_<SERVICE>` (as
/// Harness's `STEPGROUPID_STEPID`).
pub fn service_aliases(run: &StepRun, service: &str) -> Vec<String> {
    let action = run
        .step_context
        .pointer("/context/step/action")
        .and_then(Value::as_str)
        .unwrap_or("step");
    let harness: String = format!("{action}_{service}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    vec![service.to_owned(), harness.to_uppercase()]
}

pub fn service_body(run: &StepRun, name: &str, service: &Service) -> ContainerCreateBody {
    let mut labels = labels(run);
    labels.insert(LABEL_SERVICE.to_owned(), name.to_owned());
    let resources = service.resources.clone().unwrap_or_default();
    ContainerCreateBody {
        image: service.image.clone(),
        hostname: Some(name.to_owned()),
        labels: Some(labels),
        env: Some(
            service
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        entrypoint: service.entrypoint.clone(),
        cmd: service.command.clone(),
        host_config: Some(HostConfig {
            init: Some(true),
            privileged: Some(service.privileged),
            network_mode: Some(network_name(run)),
            nano_cpus: resources.cpus.map(|c| (c * 1e9) as i64),
            memory: resources
                .memory
                .as_deref()
                .and_then(|m| parse_memory(m).ok()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network_name(run),
                EndpointSettings {
                    aliases: Some(service_aliases(run, name)),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

/// Where the step's own daemon puts its socket, in the volume the step mounts at the same place.
pub const DIND_SOCKET_DIR: &str = "/run/dind";
/// Where the daemon keeps images and containers: a volume, since overlay2 cannot stack on the container's own
/// overlay root.
pub const DIND_DATA_DIR: &str = "/var/lib/docker";

/// The two volumes of a `docker: dind` step.
pub struct DindVolumes {
    pub data: String,
    pub socket: String,
}

pub fn dind_volumes(run: &StepRun) -> DindVolumes {
    DindVolumes {
        data: format!("runner-dind-{}-data", run.step_id),
        socket: format!("runner-dind-{}-socket", run.step_id),
    }
}

pub fn volume_body(run: &StepRun, name: &str) -> VolumeCreateRequest {
    VolumeCreateRequest {
        name: Some(name.to_owned()),
        labels: Some(labels(run)),
        ..Default::default()
    }
}

fn volume_mount(volume: &str, target: &str) -> Mount {
    Mount {
        typ: Some(MountType::VOLUME),
        source: Some(volume.to_owned()),
        target: Some(target.to_owned()),
        ..Default::default()
    }
}

/// How the step's daemon is told apart from a user's service: readiness is its API answering on the socket.
pub fn dind_service(image: &str) -> Service {
    Service {
        image: Some(image.to_owned()),
        readiness: Some(Readiness::Exec(vec![
            "docker".into(),
            "--host".into(),
            format!("unix://{DIND_SOCKET_DIR}/docker.sock"),
            "version".into(),
        ])),
        ..Default::default()
    }
}

/// The step's own Docker daemon. `privileged` would be the usual way, but it asks for every capability, and
/// daemons that run sandboxed themselves (as on these machines, which lack CAP_SYS_RESOURCE) refuse it with
/// "unable to apply caps". So the container gets every capability but that one, no seccomp or AppArmor profile,
/// no masked or read-only /proc paths, and its own cgroup namespace, whose hierarchies the image's entrypoint mounts writable;
/// that is what dockerd and runc need. It is still root on the host in all but name: the README says so.
pub fn dind_body(run: &StepRun, image: &str) -> ContainerCreateBody {
    let service = dind_service(image);
    let mut body = service_body(run, DIND_SERVICE, &service);
    let volumes = dind_volumes(run);
    let host = body.host_config.get_or_insert_with(Default::default);
    host.privileged = Some(false);
    host.cap_add = Some(vec!["ALL".into()]);
    host.cap_drop = Some(vec!["SYS_RESOURCE".into()]);
    host.security_opt = Some(vec![
        "seccomp=unconfined".into(),
        "apparmor=unconfined".into(),
    ]);
    // The API's form of the CLI's `--security-opt systempaths=unconfined`: no masked or read-only /proc paths.
    host.masked_paths = Some(vec![]);
    host.readonly_paths = Some(vec![]);
    host.cgroupns_mode = Some(HostConfigCgroupnsModeEnum::PRIVATE);
    host.mounts = Some(vec![
        volume_mount(&volumes.data, DIND_DATA_DIR),
        volume_mount(&volumes.socket, DIND_SOCKET_DIR),
    ]);
    // docker-init would sit between the entrypoint's dockerd and its shims; dockerd reaps its own children.
    host.init = Some(false);
    body
}

/// What the agent reads from stdin: the step context it writes to `step_context.json` before the action starts,
/// the runner secrets, and the nonce of the line it prints `step_result.json` on. One write instead of an archive
/// upload and download through the daemon (which mounts the container's filesystem each time).
pub fn stdin_envelope(run: &StepRun, result_marker: &str) -> Vec<u8> {
    let mut envelope = serde_json::to_vec(&serde_json::json!({
        "step_context": run.step_context,
        "secrets": run.secrets.0,
        "result_marker": result_marker,
    }))
    .expect("a Value serialises");
    envelope.push(b'\n');
    envelope
}

/// Recognises the agent's result line, `[opschain-result <marker>] <json>`.
pub fn result_line(line: &str, marker: &str) -> Option<Result<Value, String>> {
    let rest = line
        .strip_prefix("[opschain-result ")?
        .strip_prefix(marker)?
        .strip_prefix("] ")?;
    Some(serde_json::from_str(rest).map_err(|e| e.to_string()))
}

/// Extracts `step_result.json` from the archive the daemon returns for it.
pub fn result_from_tar(archive: &[u8]) -> Result<Option<Value>, String> {
    let mut archive = tar::Archive::new(archive);
    let entries = archive.entries().map_err(|e| e.to_string())?;
    for entry in entries {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if entry.header().entry_type().is_file() {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| e.to_string());
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretValues;
    use serde_json::json;
    use std::time::Duration;

    fn run() -> StepRun {
        StepRun {
            change_id: "c1".into(),
            step_id: "s1".into(),
            owner: "o1".into(),
            store: "st".into(),
            image: "runner-step:abc".into(),
            step_context: json!({"context": {"step": {"id": "s1"}}}),
            secrets: SecretValues([("TOKEN".into(), "canary-value".into())].into()),
            timeout: None,
            stop_grace: Duration::from_secs(10),
            services: Default::default(),
            docker: None,
            resources: None,
        }
    }

    #[test]
    fn container_carries_labels_and_no_secret() {
        let body = container_body(&run(), "/var/run/docker.sock");
        let labels = body.labels.clone().unwrap();
        assert_eq!(labels["runner.owner"], "o1");
        assert_eq!(labels["runner.store"], "st");
        assert_eq!(labels["runner.change"], "c1");
        assert_eq!(labels["runner.step"], "s1");
        assert_eq!(body.image.as_deref(), Some("runner-step:abc"));
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(true));
        assert_eq!(body.host_config.as_ref().unwrap().init, Some(true));
        assert_eq!(body.env.as_ref().unwrap(), &vec![STDIN_ENVELOPE.to_owned()]);
        let everything = serde_json::to_string(&body).unwrap();
        assert!(!everything.contains("canary-value"), "{everything}");
        assert!(!everything.contains("TOKEN"), "{everything}");
        assert_eq!(container_name(&run()), "runner-step-s1-o1");
    }

    #[test]
    fn a_step_is_confined_by_its_limits_no_new_privileges_and_fewer_capabilities() {
        let mut run = run();
        run.resources = Some(crate::policy::StepResources {
            memory: 64 << 20,
            cpus: 0.5,
            pids: 64,
        });
        let host = container_body(&run, "/var/run/docker.sock")
            .host_config
            .unwrap();
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20), "no swap beyond the limit");
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        let kept = host.cap_add.unwrap();
        for dropped in ["NET_RAW", "MKNOD", "SYS_ADMIN", "SYS_CHROOT", "SETPCAP"] {
            assert!(!kept.contains(&dropped.to_owned()), "{dropped}");
        }
        assert!(kept.contains(&"CHOWN".to_owned()));
        assert_eq!(host.privileged, None);
        assert_eq!(host.init, Some(true), "the rest of the body is kept");

        // Without limits (no policy given) the container still gets the privilege and capability rules.
        run.resources = None;
        let host = container_body(&run, "/var/run/docker.sock")
            .host_config
            .unwrap();
        assert_eq!((host.memory, host.pids_limit), (None, None));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    }

    #[test]
    fn the_limit_that_ended_a_step_is_named() {
        let resources = crate::policy::StepResources {
            memory: 64 << 20,
            cpus: 1.0,
            pids: 64,
        };
        assert_eq!(
            limit_hit(true, None, Some(&resources)).unwrap().to_string(),
            "out of memory (limit 64MiB)"
        );
        let bombed = json!({"exit": {"code": null, "signal": "SIGKILL", "limit": {"pids": "64"}}});
        assert_eq!(
            limit_hit(false, Some(&bombed), Some(&resources))
                .unwrap()
                .to_string(),
            "process limit reached (pids 64)"
        );
        let fine = json!({"exit": {"code": 1, "signal": null}});
        assert_eq!(limit_hit(false, Some(&fine), Some(&resources)), None);
        assert_eq!(limit_hit(false, None, None), None);
    }

    #[test]
    fn docker_socket_access_mounts_the_hosts_socket_only_when_asked() {
        let mut run = run();
        let plain = container_body(&run, "/run/docker.sock");
        assert_eq!(plain.host_config.unwrap().binds, None);
        run.docker = Some(StepDocker::Socket);
        let body = container_body(&run, "/run/docker.sock");
        assert_eq!(
            body.host_config.unwrap().binds,
            Some(vec!["/run/docker.sock:/var/run/docker.sock".to_owned()])
        );
        assert!(body
            .env
            .unwrap()
            .contains(&"DOCKER_HOST=unix:///var/run/docker.sock".to_owned()));
    }

    #[test]
    fn services_get_a_private_network_aliases_and_labels() {
        let mut run = run();
        run.step_context =
            serde_json::json!({"context": {"step": {"id": "s1", "action": "integration-test"}}});
        assert_eq!(
            container_body(&run, "/var/run/docker.sock")
                .host_config
                .unwrap()
                .network_mode,
            None,
            "no services, default network"
        );
        let db = Service {
            image: Some("postgres:local".into()),
            env: [("POSTGRES_PASSWORD".to_owned(), "x".to_owned())].into(),
            resources: Some(crate::actions::Resources {
                cpus: Some(0.5),
                memory: Some("256Mi".into()),
            }),
            ..Default::default()
        };
        run.services.insert("db".into(), db.clone());
        assert_eq!(
            container_body(&run, "/var/run/docker.sock")
                .host_config
                .unwrap()
                .network_mode
                .as_deref(),
            Some("runner-net-s1")
        );
        let body = service_body(&run, "db", &db);
        let labels = body.labels.clone().unwrap();
        assert_eq!(
            (
                labels["runner.service"].as_str(),
                labels["runner.step"].as_str(),
                labels["runner.owner"].as_str()
            ),
            ("db", "s1", "o1")
        );
        let host = body.host_config.clone().unwrap();
        assert_eq!(
            (host.nano_cpus, host.memory),
            (Some(500_000_000), Some(256 << 20))
        );
        assert_eq!(host.port_bindings, None, "nothing is published on the host");
        let aliases = body.networking_config.unwrap().endpoints_config.unwrap()["runner-net-s1"]
            .aliases
            .clone()
            .unwrap();
        assert_eq!(aliases, ["db", "INTEGRATION_TEST_DB"]);
        assert_eq!(network_body(&run).labels.unwrap()["runner.change"], "c1");
        assert_eq!(service_container_name(&run, "db"), "runner-svc-s1-o1-db");
    }

    #[test]
    fn dind_runs_a_daemon_of_the_steps_own_sharing_only_its_socket() {
        let mut run = run();
        run.docker = Some(StepDocker::Dind {
            image: "runner/opschain-dind:1".into(),
        });
        assert!(needs_network(&run));
        assert_eq!(service_names(&run), ["docker"]);

        let step = container_body(&run, "/var/run/docker.sock");
        assert!(step
            .env
            .as_ref()
            .unwrap()
            .contains(&"DOCKER_HOST=unix:///run/dind/docker.sock".to_owned()));
        let host = step.host_config.unwrap();
        assert_eq!(host.binds, None, "the host's socket is not mounted");
        assert_eq!(host.privileged, None, "the step itself stays unprivileged");
        assert_eq!(host.network_mode.as_deref(), Some("runner-net-s1"));
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].source.as_deref(), Some("runner-dind-s1-socket"));
        assert_eq!(mounts[0].target.as_deref(), Some("/run/dind"));

        let daemon = dind_body(&run, "runner/opschain-dind:1");
        assert_eq!(daemon.image.as_deref(), Some("runner/opschain-dind:1"));
        assert_eq!(daemon.hostname.as_deref(), Some("docker"));
        let labels = daemon.labels.clone().unwrap();
        assert_eq!(
            (
                labels["runner.service"].as_str(),
                labels["runner.step"].as_str()
            ),
            ("docker", "s1")
        );
        let host = daemon.host_config.unwrap();
        assert_eq!(host.cap_add, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_drop, Some(vec!["SYS_RESOURCE".to_owned()]));
        assert!(host
            .security_opt
            .unwrap()
            .contains(&"seccomp=unconfined".to_owned()));
        assert_eq!(
            host.cgroupns_mode,
            Some(HostConfigCgroupnsModeEnum::PRIVATE)
        );
        assert_eq!(
            (host.masked_paths.clone(), host.readonly_paths.clone()),
            (Some(vec![]), Some(vec![]))
        );
        assert_eq!(host.port_bindings, None, "nothing is published on the host");
        let targets: Vec<_> = host
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| (m.source.unwrap(), m.target.unwrap()))
            .collect();
        assert_eq!(
            targets,
            [
                (
                    "runner-dind-s1-data".to_owned(),
                    "/var/lib/docker".to_owned()
                ),
                ("runner-dind-s1-socket".to_owned(), "/run/dind".to_owned())
            ]
        );
        let volume = volume_body(&run, "runner-dind-s1-data");
        assert_eq!(volume.labels.unwrap()["runner.owner"], "o1");
        assert_eq!(
            dind_service("i").readiness,
            Some(Readiness::Exec(vec![
                "docker".into(),
                "--host".into(),
                "unix:///run/dind/docker.sock".into(),
                "version".into()
            ]))
        );
    }

    #[test]
    fn envelope_carries_context_secrets_and_marker_and_the_result_line_is_recognised() {
        let envelope: Value = serde_json::from_slice(&stdin_envelope(&run(), "n0nce")).unwrap();
        assert_eq!(envelope["step_context"]["context"]["step"]["id"], "s1");
        assert_eq!(envelope["secrets"]["TOKEN"], "canary-value");
        assert_eq!(envelope["result_marker"], "n0nce");
        assert_eq!(
            result_line(r#"[opschain-result n0nce] {"a":1}"#, "n0nce"),
            Some(Ok(serde_json::json!({"a": 1})))
        );
        assert_eq!(
            result_line(r#"[opschain-result forged] {"a":1}"#, "n0nce"),
            None
        );
        assert_eq!(result_line("ordinary output", "n0nce"), None);
        assert!(matches!(
            result_line("[opschain-result n0nce] {", "n0nce"),
            Some(Err(_))
        ));
    }

    #[test]
    fn result_is_read_from_the_daemons_archive() {
        let json = br#"{"steps": {}}"#;
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(json.len() as u64);
        builder
            .append_data(&mut header, "step_result.json", json.as_slice())
            .unwrap();
        let tar = builder.into_inner().unwrap();
        assert_eq!(
            result_from_tar(&tar).unwrap(),
            Some(serde_json::json!({"steps": {}}))
        );
        assert_eq!(
            result_from_tar(&tar::Builder::new(Vec::new()).into_inner().unwrap()).unwrap(),
            None
        );
    }
}
