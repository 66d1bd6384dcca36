"""Numbered SQL migrations in `migrations/`, each applied once, atomically, and recorded."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    files = []
    for path in sorted(directory.glob("*.sql")):
        match = NAME.fullmatch(path.name)
        if not match:
            raise RuntimeError(f"migration file name not of the form NNNN_name.sql: {path.name}")
        files.append((int(match.group(1)), path))
    numbers = [n for n, _ in files]
    if len(numbers) != len(set(numbers)):
        raise RuntimeError("two migrations share a number")
    return files


MIN_SQLITE = (3, 35, 0)  # RETURNING (3.35) and ALTER TABLE … DROP COLUMN (3.35)


class MigrationError(RuntimeError):
    """The database cannot be brought to this version's schema (one line, for the operator)."""


def migrate(conn: sqlite3.Connection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every migration not yet recorded; return the numbers applied.

    Safe while another process migrates the same file: each migration records itself first, in its own write
    transaction, so the second process to get there finds it recorded and moves on. A database a newer version
    migrated further than this one knows is refused: this version's code would misread it (there is no
    downgrade; restore a backup made before the upgrade)."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise MigrationError(
            f"SQLite {sqlite3.sqlite_version} is too old: Parley needs {'.'.join(map(str, MIN_SQLITE))} or later"
        )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
    )
    files = migration_files(directory)
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    known = max((number for number, _ in files), default=0)
    if done and max(done) > known:
        raise MigrationError(
            f"the database was migrated by a newer version of Parley (migration {max(done):04d}; this version knows"
            f" up to {known:04d}): run that version, or restore a backup made before the upgrade"
        )
    applied = []
    for number, path in files:
        if number in done:
            continue
        # executescript commits anything pending first, so the transaction lives inside the script. The record
        # comes first: if another process applied this migration meanwhile, it fails before any change is made.
        script = (
            "BEGIN IMMEDIATE;\n"
            f"INSERT INTO schema_migrations (version, name) VALUES ({number}, '{path.stem}');\n"
            + path.read_text()
            + "\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.IntegrityError:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            recorded = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (number,)).fetchone()
            if recorded is None:
                raise
            continue  # another process applied it
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
