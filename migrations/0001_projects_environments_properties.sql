-- Projects, their environments, and the versioned properties of both.
CREATE TABLE projects (
    id          INTEGER PRIMARY KEY,
    code        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    git_remote  TEXT,
    created_at  TEXT NOT NULL
);

CREATE TABLE environments (
    id          INTEGER PRIMARY KEY,
    project_id  INTEGER NOT NULL REFERENCES projects(id),
    code        TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (project_id, code)
);

-- One row per write. The primary key is the optimistic-concurrency guard: two writers based on the same version
-- both try to insert version + 1 and exactly one wins.
CREATE TABLE property_versions (
    owner_kind  TEXT NOT NULL CHECK (owner_kind IN ('project', 'environment')),
    owner_id    INTEGER NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    document    TEXT NOT NULL,
    written_at  TEXT NOT NULL,
    written_by  TEXT NOT NULL,
    change_id   TEXT,
    step_id     TEXT,
    PRIMARY KEY (owner_kind, owner_id, version)
);
