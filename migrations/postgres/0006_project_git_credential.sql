-- PostgreSQL twin of migrations/0006: the name of the secret holding a project's git remote credential.
ALTER TABLE projects ADD COLUMN git_credential TEXT;
