-- PostgreSQL twin of migrations/0020. The web view: the changes list is read newest first (all changes, or one state), and a step page finds the
-- property versions its step wrote.
CREATE INDEX changes_by_created ON changes (created_at);
CREATE INDEX changes_by_state_created ON changes (state, created_at);
CREATE INDEX property_versions_by_step ON property_versions (step_id);
