-- SQLite twin of migrations/postgres/0060 (wake-ups by LISTEN/NOTIFY triggers), on purpose without a statement:
-- SQLite has no notifications between processes. One process owns a SQLite store's work; its writers signal the
-- followers of that same process after they commit (src/store/wakeups.rs), and a follower polls at its fallback
-- interval for what other processes (a `change create --background` child, a second CLI) wrote.
SELECT 1;
