-- PostgreSQL twin of migrations/0007: the base runner image set on a project or one environment.
CREATE TABLE base_image_settings (
    owner_kind  TEXT NOT NULL CHECK (owner_kind IN ('project', 'environment')),
    owner_id    BIGINT NOT NULL,
    image       TEXT NOT NULL,
    set_at      TEXT NOT NULL,
    PRIMARY KEY (owner_kind, owner_id)
);
