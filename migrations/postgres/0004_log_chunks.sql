-- PostgreSQL twin of migrations/0004: log lines packed into compressed chunks, numbered in the change's sequence.
CREATE TABLE log_chunks (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    first_seq   BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    -- Unix milliseconds of the first and last line.
    first_at    BIGINT NOT NULL,
    last_at     BIGINT NOT NULL,
    -- Bytes of the lines themselves (with a newline each), before packing.
    text_bytes  BIGINT NOT NULL,
    encoding    TEXT NOT NULL,
    raw_len     BIGINT NOT NULL,
    data        BYTEA NOT NULL,
    PRIMARY KEY (change_id, first_seq)
);
