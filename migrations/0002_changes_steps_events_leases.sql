-- Changes, their step trees, the event log every watcher replays, and the leases of live runner processes.
CREATE TABLE changes (
    id              TEXT PRIMARY KEY,
    project_id      INTEGER NOT NULL REFERENCES projects(id),
    environment_id  INTEGER NOT NULL REFERENCES environments(id),
    action          TEXT NOT NULL,
    git_rev         TEXT NOT NULL,
    git_sha         TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    owner           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT
);
CREATE INDEX changes_by_environment ON changes (environment_id, state);

CREATE TABLE steps (
    id              TEXT PRIMARY KEY,
    change_id       TEXT NOT NULL REFERENCES changes(id),
    parent_id       TEXT REFERENCES steps(id),
    position        INTEGER NOT NULL,
    action          TEXT NOT NULL,
    state           TEXT NOT NULL,
    reason          TEXT,
    exit_code       INTEGER,
    image_id        TEXT,
    image_cached    INTEGER,
    properties      TEXT,
    children_strategy TEXT,
    project_version INTEGER,
    environment_version INTEGER,
    started_at      TEXT,
    finished_at     TEXT
);
CREATE INDEX steps_by_change ON steps (change_id, parent_id, position);

CREATE TABLE events (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    seq         INTEGER NOT NULL,
    at          TEXT NOT NULL,
    event       TEXT NOT NULL,
    PRIMARY KEY (change_id, seq)
);

-- A runner process holds a lease while it lives; containers labelled with an owner whose lease expired (or whose
-- process on this host is gone) belong to a crashed runner and are reaped.
CREATE TABLE leases (
    owner       TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
