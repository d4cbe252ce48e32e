//! The base runner image of a project or environment: set by project admins (CLI, gRPC), never by a repository or a
//! step's patches; an environment's setting wins over its project's, and without either the operator's default
//! applies. The operator's policy is enforced when a change starts (it may change after a setting is made).

use serde::Serialize;

use super::{App, Scope};
use crate::error::{Error, Result};
use crate::store::BaseImageSource;

/// The image a scope's steps start from, and which level decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseImage {
    pub image: String,
    pub source: BaseImageSource,
}

/// An image reference a setting may name: `name[:tag]` or an image ID (`sha256:` and 64 hex digits).
fn validate_image(image: &str) -> Result<()> {
    let is_id = image
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()));
    if is_id || crate::image::layered::valid_reference(image) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what: "base image",
            value: image.to_owned(),
            expected: "name an image as NAME[:TAG] (lowercase name) or sha256:<image id>, e.g. one `runner image list` shows",
        })
    }
}

impl App {
    /// Sets (`Some`) or clears (`None`) the base runner image of a project or environment; returns what its steps
    /// now start from.
    pub async fn set_base_image(&self, scope: &Scope, image: Option<&str>) -> Result<BaseImage> {
        if let Some(image) = image {
            validate_image(image)?;
        }
        let owner = self.owner(scope).await?;
        self.store.set_base_image(&owner, image).await?;
        self.base_image(scope).await
    }

    /// What a project's or environment's steps start from.
    pub async fn base_image(&self, scope: &Scope) -> Result<BaseImage> {
        let setting = match scope {
            Scope::Environment {
                project,
                environment,
            } => self.store.base_image_for(project, environment).await?,
            Scope::Project { .. } => {
                let owner = self.owner(scope).await?;
                match self.store.own_base_image(&owner).await? {
                    Some(image) => crate::store::BaseImageSetting {
                        image: Some(image),
                        source: BaseImageSource::Project,
                    },
                    None => crate::store::BaseImageSetting {
                        image: None,
                        source: BaseImageSource::Operator,
                    },
                }
            }
        };
        Ok(BaseImage {
            image: setting.image.unwrap_or_else(crate::runtime::base_image),
            source: setting.source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_images_by_reference_or_id() {
        for good in [
            "runner/opschain-runner-debian:bookworm-slim",
            "debian",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_image(good).is_ok(), "{good}");
        }
        for bad in ["", "Debian", "sha256:", "a b", "img:"] {
            let err = validate_image(bad).unwrap_err().to_string();
            assert!(err.contains("invalid base image"), "{err}");
        }
    }

    #[tokio::test]
    async fn an_environment_setting_wins_over_its_project_and_clearing_falls_back() {
        let home = tempfile::tempdir().unwrap();
        let app = App::open(home.path()).await.unwrap();
        app.create_project("p", "P", None).await.unwrap();
        app.create_environment("p", "dev", "Dev").await.unwrap();
        let project = Scope::Project {
            project: "p".into(),
        };
        let dev = Scope::Environment {
            project: "p".into(),
            environment: "dev".into(),
        };
        let operator = app.base_image(&dev).await.unwrap();
        assert_eq!(operator.source, BaseImageSource::Operator);
        assert_eq!(operator.image, crate::runtime::base_image());

        let set = app.set_base_image(&project, Some("img/p:1")).await.unwrap();
        assert_eq!(
            (set.image.as_str(), set.source),
            ("img/p:1", BaseImageSource::Project)
        );
        let inherited = app.base_image(&dev).await.unwrap();
        assert_eq!(
            (inherited.image.as_str(), inherited.source),
            ("img/p:1", BaseImageSource::Project)
        );

        app.set_base_image(&dev, Some("img/dev:1")).await.unwrap();
        let own = app.base_image(&dev).await.unwrap();
        assert_eq!(
            (own.image.as_str(), own.source),
            ("img/dev:1", BaseImageSource::Environment)
        );
        assert_eq!(app.base_image(&project).await.unwrap().image, "img/p:1");

        app.set_base_image(&dev, None).await.unwrap();
        assert_eq!(app.base_image(&dev).await.unwrap().image, "img/p:1");
        app.set_base_image(&project, None).await.unwrap();
        assert_eq!(
            app.base_image(&dev).await.unwrap().source,
            BaseImageSource::Operator
        );

        let missing = Scope::Environment {
            project: "p".into(),
            environment: "nope".into(),
        };
        let err = app
            .set_base_image(&missing, Some("img:1"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
        let err = app
            .set_base_image(&project, Some("Bad Image"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidInput);
    }
}
