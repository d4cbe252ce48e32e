-- The database itself holds the per-environment rule: at most one running change per environment, whichever
-- process or host tries to start another.
CREATE UNIQUE INDEX one_running_change_per_environment ON changes (environment_id) WHERE state = 'running';

-- Each change counts its own sequence numbers (events and log lines): a writer reserves the next ones by
-- incrementing its change's row, never by reading MAX(seq) + 1, so concurrent writers never collide.
ALTER TABLE changes ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
UPDATE changes SET last_seq = MAX(
    COALESCE((SELECT MAX(seq) FROM events WHERE events.change_id = changes.id), 0),
    COALESCE((SELECT MAX(last_seq) FROM log_chunks WHERE log_chunks.change_id = changes.id), 0));
