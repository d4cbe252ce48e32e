//! Projects and environments.

use super::db::{query, Row};
use serde::Serialize;

use super::{is_unique_violation, now, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    #[serde(skip)]
    pub id: i64,
    pub code: String,
    pub name: String,
    pub git_remote: Option<String>,
    /// The name of the secret holding the remote's credential (never its value).
    pub git_credential: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    #[serde(skip)]
    pub id: i64,
    pub project_code: String,
    pub code: String,
    pub name: String,
    pub created_at: String,
}

fn project_row(row: &Row) -> Project {
    Project {
        id: row.get("id"),
        code: row.get("code"),
        name: row.get("name"),
        git_remote: row.get("git_remote"),
        git_credential: row.get("git_credential"),
        created_at: row.get("created_at"),
    }
}

fn environment_row(row: &Row) -> Environment {
    Environment {
        id: row.get("id"),
        project_code: row.get("project_code"),
        code: row.get("code"),
        name: row.get("name"),
        created_at: row.get("created_at"),
    }
}

/// What a failed insert of `what` `code` is: AlreadyExists when the code is taken.
fn taken_as(what: &'static str, code: String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match is_unique_violation(&e) {
        true => StoreError::AlreadyExists { what, code },
        false => e.into(),
    }
}

const ENVIRONMENT_SELECT: &str =
    "SELECT e.id, p.code AS project_code, e.code, e.name, e.created_at \
     FROM environments e JOIN projects p ON p.id = e.project_id";

impl Store {
    /// Creates a project with empty properties (version 1).
    pub async fn create_project(
        &self,
        code: &str,
        name: &str,
        git_remote: Option<&str>,
    ) -> Result<Project, StoreError> {
        let mut tx = self.write_tx().await?;
        let created_at = now();
        let id: i64 = query(
            "INSERT INTO projects (code, name, git_remote, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(code)
        .bind(name)
        .bind(git_remote)
        .bind(&created_at)
        .fetch_one(&mut tx)
        .await
        .map_err(taken_as("project", code.to_owned()))?
        .get(0);
        super::properties::insert_initial(&mut tx, "project", id).await?;
        tx.commit().await?;
        Ok(Project {
            id,
            code: code.to_owned(),
            name: name.to_owned(),
            git_remote: git_remote.map(str::to_owned),
            git_credential: None,
            created_at,
        })
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>, StoreError> {
        let rows = query("SELECT * FROM projects ORDER BY code")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(project_row).collect())
    }

    /// One keyset page of projects: at most `limit` of them, in code order, from the first whose code comes after
    /// `after` (from the first of all without one). Projects created or deleted since the previous page neither
    /// shift nor repeat an entry, and the page is cut by the database, not from the whole list.
    pub async fn projects_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Project>, StoreError> {
        let rows = query(format!(
            "SELECT * FROM projects WHERE code > ? ORDER BY code LIMIT {limit}"
        ))
        .bind(after.unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(project_row).collect())
    }

    pub async fn project(&self, code: &str) -> Result<Project, StoreError> {
        query("SELECT * FROM projects WHERE code = ?")
            .bind(code)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| project_row(&row))
            .ok_or_else(|| StoreError::NotFound {
                what: "project",
                code: code.to_owned(),
                hint: ": list projects with `runner project list` or create it with `runner project create`"
                    .into(),
            })
    }

    /// Sets the remote and the name of its credential secret (none: the remote needs no credential).
    pub async fn set_git_remote(
        &self,
        code: &str,
        git_remote: &str,
        git_credential: Option<&str>,
    ) -> Result<Project, StoreError> {
        let done = query("UPDATE projects SET git_remote = ?, git_credential = ? WHERE code = ?")
            .bind(git_remote)
            .bind(git_credential)
            .bind(code)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(self.project(code).await.unwrap_err());
        }
        self.project(code).await
    }

    /// Creates an environment of a project with empty properties (version 1).
    pub async fn create_environment(
        &self,
        project_code: &str,
        code: &str,
        name: &str,
    ) -> Result<Environment, StoreError> {
        let project = self.project(project_code).await?;
        let mut tx = self.write_tx().await?;
        let created_at = now();
        let id: i64 = query(
            "INSERT INTO environments (project_id, code, name, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(project.id)
        .bind(code)
        .bind(name)
        .bind(&created_at)
        .fetch_one(&mut tx)
        .await
        .map_err(taken_as("environment", format!("{project_code}/{code}")))?
        .get(0);
        super::properties::insert_initial(&mut tx, "environment", id).await?;
        tx.commit().await?;
        Ok(Environment {
            id,
            project_code: project_code.to_owned(),
            code: code.to_owned(),
            name: name.to_owned(),
            created_at,
        })
    }

    pub async fn list_environments(
        &self,
        project_code: &str,
    ) -> Result<Vec<Environment>, StoreError> {
        self.project(project_code).await?;
        let rows = query(format!(
            "{ENVIRONMENT_SELECT} WHERE p.code = ? ORDER BY e.code"
        ))
        .bind(project_code)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(environment_row).collect())
    }

    /// One keyset page of a project's environments, as [`Store::projects_after`] pages projects.
    pub async fn environments_after(
        &self,
        project_code: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Environment>, StoreError> {
        self.project(project_code).await?;
        let rows = query(format!(
            "{ENVIRONMENT_SELECT} WHERE p.code = ? AND e.code > ? ORDER BY e.code LIMIT {limit}"
        ))
        .bind(project_code)
        .bind(after.unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(environment_row).collect())
    }

    pub async fn environment(
        &self,
        project_code: &str,
        code: &str,
    ) -> Result<Environment, StoreError> {
        self.project(project_code).await?;
        query(format!("{ENVIRONMENT_SELECT} WHERE p.code = ? AND e.code = ?"))
            .bind(project_code)
            .bind(code)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| environment_row(&row))
            .ok_or_else(|| StoreError::NotFound {
                what: "environment",
                code: code.to_owned(),
                hint: format!(
                    " in project {project_code:?}: list them with `runner environment list --project {project_code}`"
                ),
            })
    }
}
