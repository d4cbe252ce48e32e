-- Which base runner image a project's steps (or one environment's) start from, instead of the operator's default.
-- Set by project admins only (CLI, gRPC): never by repository files or a step's patches, which is why it is not a
-- property. No row: the level above decides (environment, then project, then the operator).
CREATE TABLE base_image_settings (
    owner_kind  TEXT NOT NULL CHECK (owner_kind IN ('project', 'environment')),
    owner_id    INTEGER NOT NULL,
    image       TEXT NOT NULL,
    set_at      TEXT NOT NULL,
    PRIMARY KEY (owner_kind, owner_id)
);
