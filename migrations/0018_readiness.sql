-- One row /readyz writes and commits on every probe: "database writable" must mean the database file and its WAL
-- take a commit (a full disk, a read-only remount or an immutable file fail it), not a TEMP table that lives
-- outside them.
CREATE TABLE readiness (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
