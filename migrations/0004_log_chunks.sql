-- Log lines live apart from the other events: runs of consecutive lines of a change packed into compressed
-- chunks (one row per chunk, not one per line). A line's number is its place in the change's event sequence, so
-- events and lines interleave by seq and nothing else has to point at them.
CREATE TABLE log_chunks (
    change_id   TEXT NOT NULL REFERENCES changes(id),
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    -- Unix milliseconds of the first and last line.
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    -- Bytes of the lines themselves (with a newline each), before packing.
    text_bytes  INTEGER NOT NULL,
    encoding    TEXT NOT NULL,
    raw_len     INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (change_id, first_seq)
);
