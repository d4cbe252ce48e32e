//! The drill's project: a small repository written from the strings below (so the drill needs no source tree),
//! one project `drill` with one environment `dev`, created through the `runner` binary.

use std::path::Path;
use std::time::Duration;

use super::process::Runner;
use super::DrillError;

pub const PROJECT: &str = "drill";
pub const ENVIRONMENT: &str = "dev";

/// Its actions. `drill` runs two steps, each writing two properties in one patch (both or neither must ever be
/// seen); `with_service` starts a service; `slow` runs until cancelled (and takes a second to clean up when it is);
/// `fail` fails; `noop` is the next change.
const ACTIONS: &str = r#"{
  "actions": {
    "drill": { "steps": ["first", "second"] },
    "first": { "run": "v=$(cat /proc/sys/kernel/random/uuid) && opschain-properties set --scope environment /first/a \"\\\"$v\\\"\" && opschain-properties set --scope environment /first/b \"\\\"$v\\\"\" && echo first done" },
    "second": { "run": "v=$(cat /proc/sys/kernel/random/uuid) && opschain-properties set --scope environment /second/a \"\\\"$v\\\"\" && opschain-properties set --scope environment /second/b \"\\\"$v\\\"\" && echo second done" },
    "with_service": {
      "run": "wget -qO- http://web:8080/",
      "services": {
        "web": {
          "image": "IMAGE",
          "entrypoint": ["/bin/sh", "-c"],
          "command": ["mkdir -p /www && echo hello > /www/index.html && sleep 1 && exec httpd -f -p 8080 -h /www"],
          "readiness": { "tcp": 8080 }
        }
      }
    },
    "slow": { "run": "trap 'echo slow caught SIGTERM; sleep 1; echo slow cleaned up; exit 143' TERM; echo drill sleeping; sleep 120 & wait" },
    "fail": { "run": "echo failing on purpose >&2; exit 3" },
    "noop": { "run": "echo next change ran" }
  }
}
"#;

/// Writes the repository under `dir/repo` (one commit on `main`) and creates the project and environment in the
/// drill's data directory.
pub async fn create(runner: &Runner, dir: &Path, base_image: &str) -> Result<(), DrillError> {
    let repo = dir.join("repo");
    write_repository(&repo, &ACTIONS.replace("IMAGE", base_image))?;
    let remote = repo.to_string_lossy().into_owned();
    let setup: [&[&str]; 2] = [
        &[
            "project",
            "create",
            "--code",
            PROJECT,
            "--name",
            "Crash drill",
            "--git-remote",
            &remote,
        ],
        &[
            "environment",
            "create",
            "--project",
            PROJECT,
            "--code",
            ENVIRONMENT,
            "--name",
            ENVIRONMENT,
        ],
    ];
    for args in setup {
        let done = runner.run(args, Duration::from_secs(60)).await?;
        if !done.success {
            return Err(DrillError::Runner {
                command: args.join(" "),
                detail: done.transcript,
            });
        }
    }
    Ok(())
}

fn write_repository(repo: &Path, actions: &str) -> Result<(), DrillError> {
    let fixture =
        |e: &dyn std::fmt::Display| DrillError::Fixture(format!("{}: {e}", repo.display()));
    std::fs::create_dir_all(repo.join(".opschain")).map_err(|e| fixture(&e))?;
    std::fs::write(repo.join(".opschain/actions.json"), actions).map_err(|e| fixture(&e))?;
    std::fs::write(repo.join("README.md"), "The crash drill's project.\n")
        .map_err(|e| fixture(&e))?;
    let git = git2::Repository::init_opts(
        repo,
        git2::RepositoryInitOptions::new().initial_head("main"),
    )
    .map_err(|e| fixture(&e))?;
    let mut index = git.index().map_err(|e| fixture(&e))?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .map_err(|e| fixture(&e))?;
    index.write().map_err(|e| fixture(&e))?;
    let tree = git
        .find_tree(index.write_tree().map_err(|e| fixture(&e))?)
        .map_err(|e| fixture(&e))?;
    let who = git2::Signature::now("drill", "drill@example.com").map_err(|e| fixture(&e))?;
    git.commit(Some("HEAD"), &who, &who, "crash drill project", &tree, &[])
        .map_err(|e| fixture(&e))?;
    Ok(())
}
