-- PostgreSQL twin of migrations/0011.
-- Step runs started for external schedulers (StepRunnerService): the run, kept after it ended so it can be read
-- and watched again, and its events (phases, build progress, masked log lines) numbered per run.
CREATE TABLE step_runs (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    git_remote      TEXT NOT NULL,
    git_rev         TEXT NOT NULL,
    action          TEXT NOT NULL,
    labels          TEXT NOT NULL,
    state           TEXT NOT NULL,
    outcome         TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    result          TEXT,
    error_code      BIGINT,
    error_reason    TEXT,
    error_message   TEXT,
    created_at      TEXT NOT NULL,
    ended_at        TEXT,
    duration_ms     BIGINT
);

CREATE TABLE step_run_events (
    run_id  TEXT NOT NULL REFERENCES step_runs(id),
    seq     BIGINT NOT NULL,
    at      TEXT NOT NULL,
    event   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
