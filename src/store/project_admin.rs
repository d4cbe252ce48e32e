//! Renaming and deleting projects and environments. A delete removes only what nothing else refers to: a project
//! without environments, an environment no change ran in (a change's history is never deleted with it); their
//! properties history and base image setting go in the same transaction.

use super::db::query;
use super::{Environment, Project, Store, StoreError};

impl Store {
    pub async fn rename_project(&self, code: &str, name: &str) -> Result<Project, StoreError> {
        let project = self.project(code).await?;
        query("UPDATE projects SET name = ? WHERE id = ?")
            .bind(name)
            .bind(project.id)
            .execute(&self.pool)
            .await?;
        self.project(code).await
    }

    pub async fn rename_environment(
        &self,
        project: &str,
        code: &str,
        name: &str,
    ) -> Result<Environment, StoreError> {
        let environment = self.environment(project, code).await?;
        query("UPDATE environments SET name = ? WHERE id = ?")
            .bind(name)
            .bind(environment.id)
            .execute(&self.pool)
            .await?;
        self.environment(project, code).await
    }

    /// Deletes a project that has no environments left.
    pub async fn delete_project(&self, code: &str) -> Result<(), StoreError> {
        let project = self.project(code).await?;
        let mut tx = self.write_tx().await?;
        let environments: i64 = query("SELECT COUNT(*) FROM environments WHERE project_id = ?")
            .bind(project.id)
            .fetch_one(&mut tx)
            .await?
            .get(0);
        if environments > 0 {
            return Err(StoreError::InUse {
                what: "project",
                code: code.to_owned(),
                by: format!("{environments} environment(s): delete them first"),
            });
        }
        for sql in [
            "DELETE FROM property_versions WHERE owner_kind = 'project' AND owner_id = ?",
            "DELETE FROM base_image_settings WHERE owner_kind = 'project' AND owner_id = ?",
            "DELETE FROM projects WHERE id = ?",
        ] {
            query(sql).bind(project.id).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes an environment no change ran in.
    pub async fn delete_environment(&self, project: &str, code: &str) -> Result<(), StoreError> {
        let environment = self.environment(project, code).await?;
        let mut tx = self.write_tx().await?;
        let changes: i64 = query("SELECT COUNT(*) FROM changes WHERE environment_id = ?")
            .bind(environment.id)
            .fetch_one(&mut tx)
            .await?
            .get(0);
        if changes > 0 {
            return Err(StoreError::InUse {
                what: "environment",
                code: code.to_owned(),
                by: format!("{changes} change(s), whose history is kept"),
            });
        }
        for sql in [
            "DELETE FROM property_versions WHERE owner_kind = 'environment' AND owner_id = ?",
            "DELETE FROM base_image_settings WHERE owner_kind = 'environment' AND owner_id = ?",
            "DELETE FROM environments WHERE id = ?",
        ] {
            query(sql).bind(environment.id).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
