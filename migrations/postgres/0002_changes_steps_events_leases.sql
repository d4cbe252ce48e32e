-- PostgreSQL twin of migrations/0002. `rowid` stands in for SQLite's implicit insertion-order column, which the
-- store orders by.
CREATE TABLE changes (
    id              TEXT PRIMARY KEY,
    rowid           BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    project_id      BIGINT NOT NULL REFERENCES projects(id),
    environment_id  BIGINT NOT NULL REFERENCES environments(id),
    action          TEXT NOT NULL,
    git_rev         TEXT NOT NULL,
    git_sha         TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    owner           TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT
);
CREATE INDEX changes_by_environment ON changes (environment_id, state);

CREATE TABLE steps (
    id              TEXT PRIMARY KEY,
    rowid           BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    change_id       TEXT NOT NULL REFERENCES changes(id),
    parent_id       TEXT REFERENCES steps(id),
    position        BIGINT NOT NULL,
    action          TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    exit_code       BIGINT,
    image_id        TEXT,
    image_cached    BIGINT,
    properties      TEXT,
    children_strategy TEXT,
    project_version BIGINT,
    environment_version BIGINT,
    started_at      TEXT,
    finished_at     TEXT
);
CREATE INDEX steps_by_change ON steps (change_id, parent_id, position);

CREATE TABLE events (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    seq         BIGINT NOT NULL,
    at          TEXT NOT NULL,
    event       TEXT NOT NULL,
    PRIMARY KEY (change_id, seq)
);

-- A runner process holds a lease while it lives; containers labelled with an owner whose lease expired (or whose
-- process on this host is gone) belong to a crashed runner and are reaped.
CREATE TABLE leases (
    owner       TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
