-- The change tree as persisted state: a step whose turn has come is `ready`, and any eligible worker may claim it.
-- A claimed step is `running` with the claiming worker (`worker`, a lease owner) and a fresh fencing token
-- (`claim`): its end lands only with that token, so a worker whose step was reaped or re-queued writes nothing.
-- The manifest's per-action flags the store needs to advance the tree without the manifest are kept on the step;
-- `worker_losses` counts the re-runs a step had because its worker was lost (capped).
ALTER TABLE steps ADD COLUMN worker TEXT;
ALTER TABLE steps ADD COLUMN claim TEXT;
ALTER TABLE steps ADD COLUMN ignore_failure INTEGER NOT NULL DEFAULT 0;
ALTER TABLE steps ADD COLUMN retry_on_worker_loss INTEGER NOT NULL DEFAULT 0;
ALTER TABLE steps ADD COLUMN worker_losses INTEGER NOT NULL DEFAULT 0;
CREATE INDEX steps_ready ON steps (state) WHERE state = 'ready';
CREATE INDEX steps_running_by_worker ON steps (worker) WHERE state = 'running' AND claim IS NOT NULL;

-- Ended attempts keep who ran each step.
ALTER TABLE step_attempts ADD COLUMN worker TEXT;
ALTER TABLE step_attempts ADD COLUMN ignore_failure INTEGER NOT NULL DEFAULT 0;
ALTER TABLE step_attempts ADD COLUMN retry_on_worker_loss INTEGER NOT NULL DEFAULT 0;
