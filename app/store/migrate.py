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


def migrate(conn: sqlite3.Connection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every migration not yet recorded; return the numbers applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for number, path in migration_files(directory):
        if number in done:
            continue
        # executescript commits anything pending first, so the transaction lives inside the script.
        script = (
            "BEGIN IMMEDIATE;\n"
            + path.read_text()
            + f"\nINSERT INTO schema_migrations (version, name) VALUES ({number}, '{path.stem}');\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
