"""The `parley` command: serve, migrate, keys, agents, backup."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from app.clock import SystemClock, iso
from app.config import ConfigError, Settings, listen_address, load_settings
from app.domain import agent_registry, keys
from app.domain.agents import load_agents_file, resolve_secret
from app.domain.errors import NotFound, Unauthorized, ValidationFailed
from app.domain.types import NOT_ONE_LINE, ONE_LINE_PATTERN
from app.llm.tools import check_tools
from app.scheduler import HTTP_DRAIN_SECONDS
from app.store import agents as agents_store
from app.store import orgs
from app.store.db import BUSY_TIMEOUT_MS, connect_sync, is_busy, is_unwritable, write_sync
from app.store.migrate import MigrationError, migrate

if TYPE_CHECKING:
    import uvicorn

STARTUP_FAILURE = 3  # the exit status uvicorn gives a server whose start-up failed
BACKLOG = 2048  # uvicorn's default

DEV_ORG = "dev"

log = logging.getLogger("parley.db")


def _name(text: str) -> str:
    """An org or key name given on the command line: what the API accepts for a key's name."""
    if not 1 <= len(text) <= 255 or not re.search(ONE_LINE_PATTERN, text):
        raise argparse.ArgumentTypeError("must be 1 to 255 characters, without control characters (such as a newline)")
    return text


def _one_line(text: str) -> str:
    """A stored name as one line of `keys list` output (names stored before control characters were refused)."""
    return re.sub(f"[\\\\{NOT_ONE_LINE}]", lambda m: "\\\\" if m.group() == "\\" else f"\\u{ord(m.group()):04x}", text)


def _now() -> int:
    return SystemClock().now_ms()


def _bad_database(settings: Settings, exc: Exception) -> ConfigError:
    if is_busy(exc):
        return ConfigError(
            f"PARLEY_DATABASE={settings.database!r} stayed locked by another process for"
            f" {BUSY_TIMEOUT_MS // 1000} s (a migration still running, or a process stuck in a write?): try again"
        )
    return ConfigError(f"PARLEY_DATABASE must be a writable SQLite file, got {settings.database!r} ({exc})")


def _connect(settings: Settings) -> sqlite3.Connection:
    """The database for a command; one that cannot be opened (a missing parent, a directory, not SQLite) is
    reported as a bad PARLEY_DATABASE."""
    try:
        return connect_sync(settings.database)
    except (OSError, sqlite3.Error) as exc:
        raise _bad_database(settings, exc) from None


def _migrate(settings: Settings, conn: sqlite3.Connection) -> list[int]:
    try:
        applied = migrate(conn)
    except MigrationError as exc:
        conn.close()
        raise ConfigError(f"PARLEY_DATABASE={settings.database!r}: {exc}") from None
    except sqlite3.Error as exc:  # a read-only file or directory
        conn.close()
        raise _bad_database(settings, exc) from None
    if applied:
        log.info("database migrated: %s", ", ".join(f"{number:04d}" for number in applied))
    return applied


def _open(settings: Settings) -> sqlite3.Connection:
    conn = _connect(settings)
    _migrate(settings, conn)
    return conn


def _check_database(settings: Settings) -> None:
    """Migrate, and make sure the server will be able to write, before it starts."""
    conn = _open(settings)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A write, rolled back: SQLite opens a file it may not write read-only, and only a write says so.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise _bad_database(settings, exc) from None
    finally:
        conn.close()


def ensure_dev_key(settings: Settings) -> str:
    """The dev org's key: made on first run, saved to data/dev-api-key, reused while it still works."""
    path = settings.data_dir / "dev-api-key"
    conn = _open(settings)
    try:
        if path.is_file():
            raw = path.read_text().strip()
            try:
                keys.authenticate(conn, raw, _now())
                return raw
            except Unauthorized:
                pass

        def make(c: sqlite3.Connection) -> str:
            org_id = orgs.get_or_create_org(c, DEV_ORG, _now())
            return keys.create_key(c, org_id, "dev", None, _now(), test=True).key

        raw = write_sync(conn, make)
    finally:
        conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT: narrowed before the write
        out.write(raw + "\n")
    return raw


def _listen(settings: Settings, args: argparse.Namespace) -> list[socket.socket]:
    """Resolve and bind the listen address, and keep it: the server is handed these very sockets, so that a
    host that is not this machine's or a port in use stops start-up with one line, before anything else runs,
    and no other process can take the port between this check and the server's start."""
    host_name = "--host" if args.host is not None else "PARLEY_HOST"
    port_name = "--port" if args.port is not None else "PARLEY_PORT"
    host, port = settings.host, settings.port
    try:
        # Only the local resolver: IP literals need no lookup, and the port is never a service name.
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        problem = f"{host_name} must be an address or host name of this machine, got {host!r} ({exc.strerror})"
        raise ConfigError(problem) from None
    bound: list[socket.socket] = []
    try:
        # Each address once (a resolver can name one twice), as asyncio's own server does.
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{port_name} must be a free port, got {port} (in use on {host})") from None
                if exc.errno == errno.EACCES:
                    raise ConfigError(f"{port_name} must be a port this user may listen on, got {port}") from None
                raise ConfigError(
                    f"{host_name} must be an address of this machine, got {host!r} ({exc.strerror})"
                ) from None
            # Listening at once: a socket that is only bound can still be bound by another that sets SO_REUSEADDR
            # (asyncio's servers do). Connections made meanwhile wait in the backlog until the server is up.
            sock.listen(BACKLOG)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _check_agents_file(settings: Settings) -> None:
    """Parse the agents file (and find the secrets it names) before anything syncs it, so that a mistake in it
    is one line naming PARLEY_AGENTS_FILE. A missing file is a mistake too, the default one included: syncing
    no agents would retire every managed agent."""
    try:
        entries = load_agents_file(settings.agents_file)
    except ValueError as exc:
        raise ConfigError(f"PARLEY_AGENTS_FILE: {exc}") from None
    for entry in entries:
        try:
            resolve_secret(entry.tool_secret, slug=entry.slug, dotenv=settings.dotenv)
            # The outbound-URL guard's registration rules, as for a custom agent's tools, but without DNS: a slow
            # resolver must not hold up start-up (a name is checked by the guard when each call connects).
            check_tools(entry.tools, settings, resolve=_unresolved)
        except ValidationFailed as exc:
            raise ConfigError(
                f"PARLEY_AGENTS_FILE: {settings.agents_file}: agent {entry.slug}: {exc.message}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"PARLEY_AGENTS_FILE: {settings.agents_file}: {exc}") from None


def _unresolved(host: str, port: int) -> list[str]:
    raise OSError("not looked up")


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, except that a Ctrl-C while it stops (a second one, or one after SIGTERM) ends the process at
    once (`_stop_now`)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                _stop_now()
            super().handle_exit(sig, frame)

    return Server(config)


def _stop_now() -> None:
    """End the process by SIGINT, now, as a crash would end it, with one log line.

    uvicorn's own answer to a second Ctrl-C (during its drain only: later ones wait out the shutdown) cancels the
    application's shutdown, whose cut-off clean-up then logs a traceback. Ending at once loses nothing answered:
    every write is committed (WAL, synchronous=FULL) before its request is answered, and the next start-up settles
    what was cut off, as after a crash."""
    logging.getLogger("parley.server").warning(
        "Ctrl-C while stopping: stopping at once; what was still running is settled at the next start"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.raise_signal(signal.SIGINT)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.api.app import create_app
    from app.observability import configure_logging

    sockets = _listen(settings, args)
    interrupted = False
    try:
        configure_logging(settings.log_format)
        # The lifespan migrates and syncs agents; checking both here first turns a mistake in either into one
        # readable line instead of a failed start-up with a traceback.
        _check_agents_file(settings)
        _check_database(settings)
        if args.dev:
            raw = ensure_dev_key(settings)
            print(f"Dev API key (saved to {settings.data_dir / 'dev-api-key'}):\n{raw}", flush=True)
        print(
            f"Parley serving on http://{listen_address(settings.host, settings.port)} ({settings.sms_provider})",
            flush=True,
        )
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            backlog=BACKLOG,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=HTTP_DRAIN_SECONDS,
            lifespan="on",
        )
        server = _server(config)
        try:
            server.run(sockets=sockets)
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on once it has stopped
            interrupted = True
    finally:
        for sock in sockets:
            sock.close()
    if interrupted:
        # End by the signal, as a SIGTERM ends (uvicorn re-raises that one): status 130 for a shell or supervisor.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
    return 0 if server.started else STARTUP_FAILURE


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    conn = _connect(settings)
    try:
        applied = _migrate(settings, conn)
    finally:
        conn.close()
    # Numbered as the files in migrations/ are, and as `serve` logs them.
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(f'{n:04d}' for n in applied)}" if applied else ""))
    return 0


def _no_database(settings: Settings, what: str) -> bool:
    """Whether there is nothing at PARLEY_DATABASE to read (said in one line): opening it would create an empty
    database, and a mistyped path would then list nothing, or find no key, and leave a stray database behind. (Something
    there that is no database, a directory say, is the one-line configuration error of `_connect`.)"""
    if Path(settings.database).exists():
        return False
    print(f"no database {what} at PARLEY_DATABASE={settings.database}", file=sys.stderr)
    return True


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    if args.keys_command != "create" and _no_database(settings, f"to {args.keys_command} keys in"):
        return 1
    conn = _open(settings)
    try:
        if args.keys_command == "create":
            created = write_sync(
                conn,
                lambda c: keys.create_key(c, orgs.get_or_create_org(c, args.org, _now()), args.name, None, _now()),
            )
            print(created.key)
        elif args.keys_command == "list":
            org_id = orgs.find_org(conn, args.org)
            if org_id is None:
                print(f"no such org: {args.org}", file=sys.stderr)
                return 1
            for row in orgs.list_keys(conn, org_id):
                fields = [
                    row["id"],
                    row["key_prefix"],
                    _one_line(row["name"]),
                    iso(row["created_at"]),
                    iso(row["expires_at"]) or "-",
                    iso(row["revoked_at"]) or "-",
                ]
                print(" ".join(str(f) for f in fields))
        elif args.keys_command == "revoke":
            try:
                row = write_sync(conn, lambda c: keys.revoke(c, args.key_id, _now()))
            except NotFound:
                print(f"no such key: {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {row['id']}")
    finally:
        conn.close()
    return 0


def cmd_agents(settings: Settings, args: argparse.Namespace) -> int:
    if args.agents_command == "sync":
        _check_agents_file(settings)
    elif _no_database(settings, "to list agents from"):
        return 1
    conn = _open(settings)
    try:
        if args.agents_command == "sync":
            slugs = write_sync(
                conn, lambda c: agent_registry.sync_managed(c, settings.agents_file, _now(), settings.dotenv)
            )
            print(f"synced {len(slugs)} managed agent(s): {', '.join(slugs)}")
        else:
            for agent in agents_store.list_managed(conn):
                line = f"{agent.id} {agent.slug} {agent.settings.name}"
                if args.secrets:
                    line += f" {agent.tool_secret}"
                print(line)
    finally:
        conn.close()
    return 0


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.exists():
        print(f"refusing to overwrite {target}", file=sys.stderr)
        return 1
    if _no_database(settings, "to back up"):  # its "backup" would hide a mistyped path
        return 1
    source = _connect(settings)
    # Written beside the target and put in its place only once whole and checked: a failed or interrupted backup
    # leaves no file at PATH (which would refuse the retry). Only SIGKILL (or a power cut) can leave the hidden
    # partial file behind. Ctrl-C, SIGTERM and SIGHUP (unless ignored: under `nohup` a hang-up stays ignored) are
    # handled by `_Stop`.
    partial: Path | None = None
    dest: sqlite3.Connection | None = None
    started = time.monotonic()
    stop = _Stop()
    original = {sig: signal.signal(sig, stop) for sig in _STOPS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
        partial = Path(name)
        os.close(handle)
        stop.copying = True  # a stop from now on interrupts the copy (once its one step returns)
        if stop.signum is not None:  # one came before there was anything to interrupt
            raise _Stopped(stop.signum)
        dest = sqlite3.connect(str(partial))
        # One step, in one read transaction: a consistent snapshot, and in WAL mode the server's writes carry
        # on meanwhile. A backup in several steps starts over whenever the server writes between two of them,
        # so under steady writes it never finished.
        source.backup(dest, pages=-1)
        ok = dest.execute("PRAGMA integrity_check").fetchone()[0]
        dest.close()
        stop.copying = False  # from here on a stop is too late: only noted, and dropped
        if ok != "ok":
            print(f"backup failed its integrity check: {ok}", file=sys.stderr)
            return 1
        try:
            _put_in_place(partial, target)
        except FileExistsError:
            print(f"refusing to overwrite {target}", file=sys.stderr)
            return 1
    except _Stopped as stopped:
        print("backup interrupted; nothing was written at PATH", file=sys.stderr)
        return 128 + stopped.signum
    except (OSError, sqlite3.Error) as exc:  # a PATH that cannot hold a database fails at the copy
        print(f"cannot write a backup to {target}: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.copying = False
        if dest is not None:
            dest.close()
        source.close()
        _remove_partial(partial)
        for sig, handler in original.items():
            signal.signal(sig, handler)
    print(f"backed up to {target} in {time.monotonic() - started:.2f}s")
    return 0


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Stop:
    """The handler of Ctrl-C, SIGTERM and SIGHUP during a backup. A stop interrupts only the copy (once its one
    step returns; the partial file is then removed); before it, it is noted and stops the backup before it
    starts; after it (a failure being reported, the tidying, the final line) it is dropped: no traceback."""

    def __init__(self) -> None:
        self.copying = False
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if self.copying:
            self.copying = False
            raise _Stopped(signum)


def _put_in_place(partial: Path, target: Path) -> None:
    """Give the finished copy its name, never over a file that appeared there meanwhile (FileExistsError)."""
    try:
        os.link(partial, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        # No hard links here (FAT, exFAT, many SMB and FUSE mounts): a rename, after one more look at PATH.
        if target.exists():
            raise FileExistsError(target) from None
        os.rename(partial, target)


def _remove_partial(partial: Path | None) -> None:
    if partial is None:
        return
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(OSError):  # never made (its directory could not be), or already gone
            partial.with_name(partial.name + suffix).unlink()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="parley", description="Self-hosted AI SMS conversations.")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="migrate, sync agents and serve the API")
    serve.add_argument("--host")
    serve.add_argument("--port")  # read by load_settings, by PARLEY_PORT's rules
    serve.add_argument("--dev", action="store_true", help="create (or reuse) the dev org's key and print it")
    sub.add_parser("migrate", help="apply database migrations")
    keys_parser = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the org if needed); prints only the key")
    create.add_argument("--org", required=True, type=_name)
    create.add_argument("--name", default="default", type=_name)
    listing = keys_sub.add_parser("list", help="list an org's keys")
    listing.add_argument("--org", required=True)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    agents = sub.add_parser("agents", help="managed agents")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True)
    agents_sub.add_parser("sync", help="sync data/agents.toml into the database")
    agent_list = agents_sub.add_parser("list", help="list managed agents")
    agent_list.add_argument("--secrets", action="store_true", help="show each agent's tool secret")
    backup = sub.add_parser("backup", help="online, consistent copy of the database")
    backup.add_argument("path")
    return top


COMMANDS = {
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "keys": cmd_keys,
    "agents": cmd_agents,
    "backup": cmd_backup,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        # Only `serve` has --host and --port; they are settings like any other, so that PARLEY_PUBLIC_URL
        # (from the environment or .env) is derived from them only when it is set in neither.
        settings = load_settings(host=getattr(args, "host", None), port=getattr(args, "port", None))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](settings, args)
    except ConfigError as exc:  # a setting only a command's first use can check (the database, say)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # agents.toml problems and the like: one readable line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as exc:  # a command's own write found the database locked too long, or read-only
        if not (is_busy(exc) or is_unwritable(exc)):
            raise
        print(f"configuration error: {_bad_database(settings, exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
