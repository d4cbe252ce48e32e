//! The base runner image set for a project or one of its environments (OpsChain's `runner.image_override`).

use super::db::query;
use serde::Serialize;

use super::{now, PropertiesOwner, Store, StoreError};

/// Where a step's base runner image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseImageSource {
    Environment,
    Project,
    /// Neither sets one: the operator's default (`RUNNER_BASE_IMAGE` or the offline image).
    Operator,
}

impl BaseImageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseImageSource::Environment => "environment",
            BaseImageSource::Project => "project",
            BaseImageSource::Operator => "operator",
        }
    }
}

/// The base image an environment's steps use, and which level set it (`image` is `None` for the operator's
/// default, which only the running process knows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseImageSetting {
    pub image: Option<String>,
    pub source: BaseImageSource,
}

impl Store {
    /// Sets (`Some`) or clears (`None`) the base image of a project or environment.
    pub async fn set_base_image(
        &self,
        owner: &PropertiesOwner,
        image: Option<&str>,
    ) -> Result<(), StoreError> {
        match image {
            Some(image) => {
                query(
                    "INSERT INTO base_image_settings (owner_kind, owner_id, image, set_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (owner_kind, owner_id) DO UPDATE SET image = excluded.image, set_at = excluded.set_at",
                )
                .bind(owner.kind())
                .bind(owner.id())
                .bind(image)
                .bind(now())
                .execute(&self.pool)
                .await?;
            }
            None => {
                query("DELETE FROM base_image_settings WHERE owner_kind = ? AND owner_id = ?")
                    .bind(owner.kind())
                    .bind(owner.id())
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Every base image some project or environment is set to (what `runner cache prune` must keep).
    pub async fn base_images_in_use(&self) -> Result<Vec<String>, StoreError> {
        let rows = query("SELECT DISTINCT image FROM base_image_settings")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get("image")).collect())
    }

    /// The base image set on exactly this project or environment, if any.
    pub async fn own_base_image(
        &self,
        owner: &PropertiesOwner,
    ) -> Result<Option<String>, StoreError> {
        let row =
            query("SELECT image FROM base_image_settings WHERE owner_kind = ? AND owner_id = ?")
                .bind(owner.kind())
                .bind(owner.id())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.get("image")))
    }

    /// What an environment's steps start from: its own setting, else its project's, else the operator's default.
    pub async fn base_image_for(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<BaseImageSetting, StoreError> {
        let environment = self.environment(project, environment).await?;
        if let Some(image) = self.own_base_image(&(&environment).into()).await? {
            return Ok(BaseImageSetting {
                image: Some(image),
                source: BaseImageSource::Environment,
            });
        }
        let project = self.project(project).await?;
        Ok(match self.own_base_image(&(&project).into()).await? {
            Some(image) => BaseImageSetting {
                image: Some(image),
                source: BaseImageSource::Project,
            },
            None => BaseImageSetting {
                image: None,
                source: BaseImageSource::Operator,
            },
        })
    }
}
