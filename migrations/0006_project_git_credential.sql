-- The name of the secret holding a project's git remote credential; the value stays in the secrets directory.
ALTER TABLE projects ADD COLUMN git_credential TEXT;
