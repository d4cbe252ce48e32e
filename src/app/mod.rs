//! The core API: what a user can ask of the runner, shared by the CLI and the gRPC layer so both have the same
//! semantics and errors. Thin over the store and the properties engine; never prints.

mod base_image;
mod git_remote;

pub use base_image::BaseImage;
pub use git_remote::FetchReport;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::properties::{self, Patch};
use crate::secrets::SecretStore;
use crate::store::{
    Environment, Project, PropertiesOwner, PropertiesVersion, PropertiesWrite, Store, StoreError,
    WrittenBy,
};

/// Which properties document a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Project {
        project: String,
    },
    Environment {
        project: String,
        environment: String,
    },
}

/// An open data directory.
#[derive(Clone, Debug)]
pub struct App {
    pub home: PathBuf,
    pub store: Store,
    pub secrets: SecretStore,
    /// The operator's policy, read once when the data directory is opened.
    pub policy: Arc<Policy>,
}

/// The default data directory: `$XDG_DATA_HOME/runner` (e.g. `~/.local/share/runner`).
pub fn default_home() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("runner")
}

/// Project and environment codes: short, lowercase, safe in paths, labels and image tags.
pub fn validate_code(what: &'static str, code: &str) -> Result<()> {
    let ok = !code.is_empty()
        && code.len() <= 50
        && code.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what,
            value: code.to_owned(),
            expected:
                "use 1-50 lowercase letters, digits, `-` or `_`, starting with a letter or digit",
        })
    }
}

/// How often an unpinned patch is re-based on a newer version before giving up.
const PATCH_RETRIES: usize = 1000;

impl App {
    /// Opens (creating) the data directory: store, secrets, and the policy `home/policy.toml` (absent = defaults).
    pub async fn open(home: &Path) -> Result<App> {
        let policy = Policy::load(home)?;
        App::open_with_policy(home, policy).await
    }

    /// Opens the data directory under a policy the operator read from elsewhere (`--policy FILE`).
    pub async fn open_with_policy(home: &Path, policy: Policy) -> Result<App> {
        App::open_with_store(home, policy, None).await
    }

    /// Opens the data directory with the store `database` names (a `postgres://` URL shared by a fleet), or the
    /// SQLite store in `home` when it is `None`.
    pub async fn open_with_store(
        home: &Path,
        policy: Policy,
        database: Option<&str>,
    ) -> Result<App> {
        crate::data_dir::prepare(home).map_err(|source| Error::Home {
            path: home.to_owned(),
            source,
        })?;
        let store = Store::connect(home, database).await?;
        let secrets = SecretStore::open(home)?;
        Ok(App {
            home: home.to_owned(),
            store,
            secrets,
            policy: Arc::new(policy),
        })
    }

    pub async fn create_project(
        &self,
        code: &str,
        name: &str,
        git_remote: Option<&str>,
    ) -> Result<Project> {
        validate_code("project code", code)?;
        if let Some(url) = git_remote {
            git_remote::check_remote(url, None)?;
        }
        Ok(self.store.create_project(code, name, git_remote).await?)
    }

    pub async fn create_environment(
        &self,
        project: &str,
        code: &str,
        name: &str,
    ) -> Result<Environment> {
        validate_code("environment code", code)?;
        Ok(self.store.create_environment(project, code, name).await?)
    }

    pub async fn owner(&self, scope: &Scope) -> Result<PropertiesOwner> {
        Ok(match scope {
            Scope::Project { project } => (&self.store.project(project).await?).into(),
            Scope::Environment {
                project,
                environment,
            } => (&self.store.environment(project, environment).await?).into(),
        })
    }

    pub async fn properties(
        &self,
        scope: &Scope,
        version: Option<i64>,
    ) -> Result<PropertiesVersion> {
        let owner = self.owner(scope).await?;
        Ok(self.store.properties(&owner, version).await?)
    }

    pub async fn properties_history(&self, scope: &Scope) -> Result<Vec<PropertiesVersion>> {
        let owner = self.owner(scope).await?;
        Ok(self.store.properties_history(&owner).await?)
    }

    /// Replaces the document. With `if_version`, only if that is still the current version.
    pub async fn set_properties(
        &self,
        scope: &Scope,
        document: Value,
        if_version: Option<i64>,
        by: WrittenBy,
    ) -> Result<PropertiesVersion> {
        let owner = self.owner(scope).await?;
        validate(&owner, &document)?;
        let expected = match if_version {
            Some(v) => v,
            None => self.store.properties(&owner, None).await?.version,
        };
        let write = PropertiesWrite {
            owner: &owner,
            expected_version: expected,
            document: &document,
        };
        Ok(self.store.write_properties(&[write], &by).await?.remove(0))
    }

    /// Applies an RFC 6902 patch. With `if_version` the patch must be based on exactly that version; without it
    /// the patch is applied to whatever is current, re-based and retried if another writer got in first, so
    /// concurrent patches of different keys never lose one another.
    pub async fn patch_properties(
        &self,
        scope: &Scope,
        patch: &Patch,
        if_version: Option<i64>,
        by: WrittenBy,
    ) -> Result<PropertiesVersion> {
        let owner = self.owner(scope).await?;
        let mut attempts = 0;
        loop {
            let current = self.store.properties(&owner, None).await?;
            if let Some(expected) = if_version {
                if expected != current.version {
                    return Err(StoreError::VersionConflict {
                        owner: owner.to_string(),
                        expected,
                        current: current.version,
                    }
                    .into());
                }
            }
            let document = properties::apply_patch(&current.document, patch)?;
            validate(&owner, &document)?;
            let write = PropertiesWrite {
                owner: &owner,
                expected_version: current.version,
                document: &document,
            };
            match self.store.write_properties(&[write], &by).await {
                Ok(mut written) => return Ok(written.remove(0)),
                Err(StoreError::VersionConflict { .. })
                    if if_version.is_none() && attempts < PATCH_RETRIES =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn validate(owner: &PropertiesOwner, document: &Value) -> Result<()> {
    match properties::validate_document(document) {
        Ok(()) => Ok(()),
        Err(properties::DocumentRuleError::NotAnObject { found }) => Err(Error::InvalidArgument {
            what: "properties document",
            value: found,
            expected: "properties must be a JSON object",
        }),
        Err(properties::DocumentRuleError::Opschain(source)) => Err(Error::InvalidProperties {
            owner: owner.to_string(),
            source,
        }),
    }
}
