-- PostgreSQL twin of migrations/0010. Idempotency keys of mutating API calls (AIP-155): the first call's request fingerprint and its encoded response,
-- kept for a window (see `store::requests::REQUEST_ID_WINDOW`). A row with no response is a call in progress.
CREATE TABLE api_requests (
    request_id  TEXT PRIMARY KEY,
    method      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    BYTEA,
    created_at  TEXT NOT NULL
);
CREATE INDEX api_requests_by_age ON api_requests (created_at);

-- A scheduler's labels on a change (to find its own changes, e.g. after a lost response).
CREATE TABLE change_labels (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (change_id, key)
);
CREATE INDEX change_labels_by_value ON change_labels (key, value);
CREATE INDEX changes_by_creation ON changes (created_at, id);
