//! What must hold after a runner was killed and another one started: nothing of the runner's left in Docker,
//! every change and step ended (a change that did not succeed says why), every step's patch applied together
//! with its end or not at all, and no half-applied patch in any properties version.

use std::collections::HashMap;

use crate::events::ChangeState;
use crate::executor::LABEL_STORE;
use crate::store::{ChangeFilter, PropertiesOwner, Store, WrittenBy};

use super::fixture::{ENVIRONMENT, PROJECT};
use super::DrillError;

/// Containers, networks and volumes labelled with this data directory, as `kind id` lines.
pub async fn left_in_docker(store_id: &str) -> Result<Vec<String>, DrillError> {
    let docker = crate::executor::docker::connect()
        .await
        .map_err(|e| DrillError::Docker(e.to_string()))?;
    let label = format!("{LABEL_STORE}={store_id}");
    let filters = || Some(HashMap::from([("label".to_owned(), vec![label.clone()])]));
    let docker_error = |e: bollard::errors::Error| DrillError::Docker(e.to_string());
    let mut left = Vec::new();
    let containers = docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: filters(),
            ..Default::default()
        }))
        .await
        .map_err(docker_error)?;
    left.extend(containers.into_iter().map(|c| {
        format!(
            "container {} ({})",
            c.names.unwrap_or_default().join(","),
            c.state.map(|s| s.to_string()).unwrap_or_default()
        )
    }));
    let networks = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: filters(),
        }))
        .await
        .map_err(docker_error)?;
    left.extend(
        networks
            .into_iter()
            .map(|n| format!("network {}", n.name.unwrap_or_default())),
    );
    let volumes = docker
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
            filters: filters(),
        }))
        .await
        .map_err(docker_error)?;
    left.extend(
        volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| format!("volume {}", v.name)),
    );
    Ok(left)
}

/// Removes whatever carries this data directory's label (after a failed trial, so a drill leaves nothing behind).
pub async fn remove_all(store_id: &str) -> Result<(), DrillError> {
    let docker = crate::executor::docker::connect()
        .await
        .map_err(|e| DrillError::Docker(e.to_string()))?;
    let label = format!("{LABEL_STORE}={store_id}");
    let filters = || Some(HashMap::from([("label".to_owned(), vec![label.clone()])]));
    let containers = docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: filters(),
            ..Default::default()
        }))
        .await
        .map_err(|e| DrillError::Docker(e.to_string()))?;
    for id in containers.into_iter().filter_map(|c| c.id) {
        let _ = docker
            .remove_container(
                &id,
                Some(bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
    }
    let networks = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: filters(),
        }))
        .await
        .map_err(|e| DrillError::Docker(e.to_string()))?;
    for id in networks.into_iter().filter_map(|n| n.id) {
        let _ = docker.remove_network(&id).await;
    }
    let volumes = docker
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
            filters: filters(),
        }))
        .await
        .map_err(|e| DrillError::Docker(e.to_string()))?;
    for volume in volumes.volumes.unwrap_or_default() {
        let _ = docker
            .remove_volume(
                &volume.name,
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await;
    }
    Ok(())
}

/// Every way the store breaks the drill's invariants, as sentences (empty when all hold).
pub async fn store_problems(store: &Store) -> Result<Vec<String>, DrillError> {
    let mut problems = Vec::new();
    let changes = store.list_changes(&ChangeFilter::default()).await?;
    let mut step_states = HashMap::new();
    for change in &changes {
        if !change.state.is_final() {
            problems.push(format!("change {} is still {}", change.id, change.state));
        } else if change.state != ChangeState::Success
            && change.reason.as_deref().unwrap_or("").trim().is_empty()
        {
            problems.push(format!(
                "change {} ended {} without a reason",
                change.id, change.state
            ));
        }
        for step in store.steps(&change.id).await? {
            if !step.state.is_final() {
                problems.push(format!(
                    "step {} ({}) of change {} is still {}",
                    step.id, step.action, change.id, step.state
                ));
            }
            step_states.insert(step.id.clone(), (step.action.clone(), step.state));
        }
    }
    let environment = store.environment(PROJECT, ENVIRONMENT).await?;
    let owner: PropertiesOwner = (&environment).into();
    let mut patched_steps = HashMap::new();
    for version in store.properties_history(&owner).await? {
        for pair in ["first", "second"] {
            let a = version.document.pointer(&format!("/{pair}/a"));
            let b = version.document.pointer(&format!("/{pair}/b"));
            if a != b {
                problems.push(format!(
                    "properties version {} holds half of a patch: /{pair}/a = {a:?}, /{pair}/b = {b:?}",
                    version.version
                ));
            }
        }
        if let WrittenBy::Change { step_id, .. } = &version.written_by {
            *patched_steps.entry(step_id.clone()).or_insert(0) += 1;
        }
    }
    for (step_id, (action, state)) in &step_states {
        let patches = patched_steps.get(step_id).copied().unwrap_or(0);
        let writes = matches!(action.as_str(), "first" | "second");
        match (state, patches) {
            (crate::events::StepState::Success, 0) if writes => problems.push(format!(
                "step {step_id} ({action}) succeeded but its patch is not in the properties history"
            )),
            (crate::events::StepState::Success, 1) => {}
            (_, 0) => {}
            (state, n) => problems.push(format!(
                "step {step_id} ({action}) ended {state} with its patch applied {n} time(s)"
            )),
        }
    }
    Ok(problems)
}
