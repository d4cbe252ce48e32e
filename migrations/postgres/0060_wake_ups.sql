-- Wake-ups (src/store/wakeups.rs): the database announces its own writes, so whichever process or host wrote
-- them, followers and workers learn of them without polling, and no writer has to remember to. NOTIFY is sent at
-- commit, and identical notifications of one transaction are sent once: a batch of log lines wakes a follower once.

-- `runner_change` (payload: the change id): an event or a log chunk of the change was stored. Not when the change's
-- row moves: every move a follower shows is also an event, and a follower woken by the row (say, `success`) before
-- the writer stored the events that go with it would read a final state without them and stop short.
CREATE FUNCTION runner_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runner_change', NEW.change_id);
    RETURN NULL;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION runner_notify_change();
CREATE TRIGGER log_chunks_notify AFTER INSERT ON log_chunks
    FOR EACH ROW EXECUTE FUNCTION runner_notify_change();

-- `runner_work` (no payload): there may be something for a worker to do. A change was created (pending), became
-- pending again (a retry), lost or gained its owner, started running, ended, or was asked to cancel; or a step
-- became ready. Payloads stay empty so that all of a transaction's collapse into one.
CREATE FUNCTION runner_notify_changes_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('runner_work', '');
        RETURN NULL;
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state OR NEW.owner IS DISTINCT FROM OLD.owner
       OR NEW.cancel_requested IS DISTINCT FROM OLD.cancel_requested THEN
        PERFORM pg_notify('runner_work', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER changes_notify AFTER INSERT OR UPDATE ON changes
    FOR EACH ROW EXECUTE FUNCTION runner_notify_changes_row();

CREATE FUNCTION runner_notify_step_ready() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runner_work', '');
    RETURN NULL;
END $$;

CREATE TRIGGER steps_ready_notify AFTER INSERT OR UPDATE OF state ON steps
    FOR EACH ROW WHEN (NEW.state = 'ready') EXECUTE FUNCTION runner_notify_step_ready();

-- `runner_step_run` (payload: the run id): an event of a step run (StepRunnerService) was stored, it ended, or a
-- cancel was asked for.
CREATE FUNCTION runner_notify_step_run_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runner_step_run', NEW.run_id);
    RETURN NULL;
END $$;

CREATE TRIGGER step_run_events_notify AFTER INSERT ON step_run_events
    FOR EACH ROW EXECUTE FUNCTION runner_notify_step_run_event();

CREATE FUNCTION runner_notify_step_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runner_step_run', NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER step_runs_notify AFTER UPDATE OF state, cancel_requested ON step_runs
    FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state OR NEW.cancel_requested IS DISTINCT FROM OLD.cancel_requested)
    EXECUTE FUNCTION runner_notify_step_run();
