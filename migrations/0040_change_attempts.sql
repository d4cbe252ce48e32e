-- Attempts: a change starts at attempt 1 and each retry makes the next one. The current attempt's step tree lives
-- in `steps` (each step saying the attempt that last ran it); a retry first copies the ended attempt's change
-- state and whole step tree here, so earlier attempts' records (their failed steps and reasons) are kept.
ALTER TABLE changes ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE steps ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;

-- One row per ended attempt that was retried; `last_seq` is its last event's number, so the events after it belong
-- to later attempts.
CREATE TABLE change_attempts (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    attempt     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    started_at  TEXT,
    finished_at TEXT,
    last_seq    INTEGER NOT NULL,
    PRIMARY KEY (change_id, attempt)
);

-- The step tree of an ended attempt, as it ended. `ord` keeps the tree's order (the steps' insertion order).
CREATE TABLE step_attempts (
    change_id       TEXT NOT NULL REFERENCES changes(id),
    attempt         INTEGER NOT NULL,
    ord             INTEGER NOT NULL,
    id              TEXT NOT NULL,
    step_attempt    INTEGER NOT NULL,
    parent_id       TEXT,
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
    finished_at     TEXT,
    PRIMARY KEY (change_id, attempt, id)
);
