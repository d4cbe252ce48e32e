//! A project's git remote as users set it: the URL (never with credentials in it), the name of the secret holding
//! its credential, and fetching the mirror on demand.

use serde::Serialize;

use super::App;
use crate::error::{Error, Result};
use crate::snapshot::remote::{self, RemoteError, Transport};
use crate::store::Project;

/// What `runner project fetch` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    pub project: String,
    pub git_remote: String,
    /// Branches and tags in the mirror after the fetch.
    pub refs: u32,
}

/// Refuses a remote with credentials in it, one git cannot reach, or a credential it would not use, before any of
/// it is stored.
pub fn check_remote(url: &str, credential: Option<&str>) -> Result<()> {
    let parsed = remote::parse_url(url)?;
    let Some(name) = credential else {
        return Ok(());
    };
    if !crate::secrets::valid_name(name) {
        return Err(crate::secrets::SecretError::InvalidName(name.to_owned()).into());
    }
    if !matches!(parsed.transport, Transport::Https | Transport::Ssh) {
        return Err(RemoteError::CredentialUnusable {
            secret: name.to_owned(),
            transport: parsed.transport,
            url: url.to_owned(),
            reason: "only HTTPS and SSH remotes take a credential".into(),
        }
        .into());
    }
    Ok(())
}

impl App {
    /// Sets a project's remote and the name of its credential secret (`None`: the remote needs none).
    pub async fn set_git_remote(
        &self,
        project: &str,
        url: &str,
        credential: Option<&str>,
    ) -> Result<Project> {
        check_remote(url, credential)?;
        Ok(self.store.set_git_remote(project, url, credential).await?)
    }

    /// Creates a project whose remote takes a credential.
    pub async fn create_project_with_credential(
        &self,
        code: &str,
        name: &str,
        git_remote: Option<&str>,
        credential: Option<&str>,
    ) -> Result<Project> {
        let Some(credential) = credential else {
            return self.create_project(code, name, git_remote).await;
        };
        let Some(url) = git_remote else {
            return Err(Error::InvalidArgument {
                what: "git credential",
                value: credential.to_owned(),
                expected: "a credential needs a git remote: give --git-remote URL too",
            });
        };
        check_remote(url, Some(credential))?;
        self.create_project(code, name, git_remote).await?;
        self.set_git_remote(code, url, Some(credential)).await
    }

    /// Fetches the project's mirror from its remote now (changes fetch it anyway when they resolve a revision).
    pub async fn fetch_project(
        &self,
        code: &str,
        timeout: std::time::Duration,
    ) -> Result<FetchReport> {
        let project = self.store.project(code).await?;
        crate::snapshot::fetch_mirror(&self.home, &self.policy, &project, timeout).await?;
        let refs =
            crate::snapshot::on_mirror(&self.home, &project, |mirror| Ok(mirror.ref_count()))
                .await?;
        Ok(FetchReport {
            project: project.code,
            git_remote: project.git_remote.unwrap_or_default(),
            refs,
        })
    }
}
