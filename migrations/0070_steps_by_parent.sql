-- A step's children are found by their parent: when a step records its children (replacing any from an earlier
-- attempt, recursively) and when a step is deleted (the parent_id foreign key's check). Without this index both
-- read every step of every change, so settling a parent cost more the more changes the store had run.
CREATE INDEX steps_by_parent ON steps (parent_id);
