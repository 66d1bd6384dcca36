"""End to end: `parley serve --dev` as `make run` starts it, and the command-line tools."""

from __future__ import annotations

import base64
import errno
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from tests.conftest import PARLEY, ROOT, call, cli, env_for, free_port, wait_until_ready
from tests.seed import SEED_CREATE
from tests.webhook_receiver import Receiver, Reply


@pytest.mark.e2e
def test_make_run_serves_and_the_readme_curl_example_answers_201(server: Any) -> None:
    base, process, tmp_path = server
    key = (tmp_path / "data" / "dev-api-key").read_text().strip()
    assert key.startswith("pk_test_")
    for secret in ("dev-api-key", "parley.db"):  # a key, and signing secrets and phone numbers: the owner's only
        assert (tmp_path / "data" / secret).stat().st_mode & 0o777 == 0o600, secret
    status, body = call("POST", base + "/v1/sms-conversations", key, SEED_CREATE)
    assert status == 201, body
    assert body["data"]["status"] == "in_progress"
    assert call("GET", base + "/readyz")[0] == 200
    status, schema = call("GET", base + "/schema/openapi.json")
    assert status == 200
    for path in ("/v1/sms-conversations", "/v1/sms-conversations/{conversation_id}/close", "/v1/api-keys"):
        assert path in schema["paths"]
    create = schema["paths"]["/v1/sms-conversations"]["post"]
    body_schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["required"] == ["toNumber"] and "agentSlug" in body_schema["properties"]
    assert {"201", "400", "401", "404", "409", "422", "502"} <= set(create["responses"])
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert "parley_http_requests_total" in metrics
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    assert time.monotonic() - started < 10
    output = (tmp_path / "server.log").read_text()
    assert key in output  # printed once at start
    assert "+15555550199" not in output and SEED_CREATE["welcomeMessage"] not in output


@pytest.mark.e2e
def test_dev_key_is_reused_on_the_next_start(tmp_path: Path) -> None:
    from app.cli import ensure_dev_key
    from app.config import load_settings

    settings = load_settings(env_for(tmp_path), env_file=None)
    first = ensure_dev_key(settings)
    assert ensure_dev_key(settings) == first


@pytest.mark.e2e
def test_a_public_url_from_dot_env_survives_the_port_and_host_flags(tmp_path: Path) -> None:
    public, token = "https://sms.example.test/parley", "token-from-env"
    (tmp_path / ".env").write_text(f"PARLEY_PUBLIC_URL={public}\n")
    env = env_for(
        tmp_path,
        PARLEY_SMS_PROVIDER="twilio",
        TWILIO_ACCOUNT_SID="AC" + "1" * 32,
        TWILIO_AUTH_TOKEN=token,
        TWILIO_API_BASE="http://127.0.0.1:9",
    )
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [PARLEY, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, process, log)
        path = "/v1/providers/twilio/inbound"
        params = {"MessageSid": "SM" + "a" * 32, "From": "+15555550199", "To": "+15555550100", "Body": "hi"}
        request = urllib.request.Request(
            base + path,
            data=urlencode(params).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                # Twilio signs over the public URL it was given, never over the listen address.
                "X-Twilio-Signature": RequestValidator(token).compute_signature(public + path, params),
            },
        )
        try:
            status = urllib.request.urlopen(request, timeout=5).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_keys_commands(tmp_path: Path) -> None:
    created = cli(tmp_path, "keys", "create", "--org", "acme", "--name", "ops")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("pk_live_") and "\n" not in key
    listed = cli(tmp_path, "keys", "list", "--org", "acme")
    fields = listed.stdout.split()
    assert len(fields) == 6
    key_id, prefix, name, created_at, expires_at, revoked_at = fields
    assert prefix == key[:12] and name == "ops" and created_at.endswith("Z")
    assert expires_at == "-" and revoked_at == "-"
    assert cli(tmp_path, "keys", "revoke", key_id).returncode == 0
    assert cli(tmp_path, "keys", "list", "--org", "acme").stdout.split()[5].endswith("Z")
    assert cli(tmp_path, "keys", "revoke", "nope").returncode == 1
    assert cli(tmp_path, "keys", "list", "--org", "nobody").returncode == 1


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (("keys", "list", "--org", "acme"), "no database to list keys in"),
        (("keys", "revoke", "KEY_ID"), "no database to revoke keys in"),
        (("agents", "list"), "no database to list agents from"),
    ],
)
def test_a_command_that_only_reads_a_mistyped_database_path_says_so_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...], said: str
) -> None:
    assert cli(tmp_path, "keys", "create", "--org", "acme").returncode == 0
    mistyped = tmp_path / "data" / "parley-typo.db"
    result = cli(tmp_path, *command, PARLEY_DATABASE=str(mistyped))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == f"{said} at PARLEY_DATABASE={mistyped}"
    assert not mistyped.exists()


@pytest.mark.parametrize(
    "flags", [("--org", ""), ("--org", "a\nb"), ("--name", ""), ("--name", "ops\nforged line"), ("--name", "a\u2028b")]
)
def test_keys_create_refuses_an_empty_name_or_one_with_a_control_character(
    tmp_path: Path, flags: tuple[str, str]
) -> None:
    args = {"--org": "acme", "--name": "ops", flags[0]: flags[1]}
    refused = cli(tmp_path, "keys", "create", *[part for pair in args.items() for part in pair])
    assert refused.returncode == 2 and "control characters" in refused.stderr
    assert "pk_" not in refused.stdout


def test_keys_list_prints_a_stored_name_with_a_newline_on_its_one_line(tmp_path: Path) -> None:
    assert cli(tmp_path, "keys", "create", "--org", "acme", "--name", "ops").returncode == 0
    conn = sqlite3.connect(tmp_path / "data" / "parley.db")
    with conn:  # a name stored before control characters were refused
        conn.execute("UPDATE api_keys SET name = 'ops\nfake-id pk_live_XXXX forged'")
    conn.close()
    listed = cli(tmp_path, "keys", "list", "--org", "acme").stdout
    assert listed.count("\n") == 1 and "ops\\u000afake-id" in listed


def test_migrate_agents_and_backup_commands(tmp_path: Path) -> None:
    migrated = cli(tmp_path, "migrate")
    assert migrated.returncode == 0 and migrated.stdout.startswith("applied ")
    assert ": 0001, 0002, " in migrated.stdout  # as the files in migrations/ are numbered, and as `serve` logs them
    assert cli(tmp_path, "migrate").stdout == "applied 0 migration(s)\n"
    synced = cli(tmp_path, "agents", "sync")
    assert "recall-sms" in synced.stdout
    listed = cli(tmp_path, "agents", "list", "--secrets")
    assert "recall-sms" in listed.stdout and "whsec_" in listed.stdout
    assert "whsec_" not in cli(tmp_path, "agents", "list").stdout
    target = tmp_path / "backup.db"
    backup = cli(tmp_path, "backup", str(target))
    assert backup.returncode == 0, backup.stderr
    conn = sqlite3.connect(target)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0] >= 1
    conn.close()
    assert cli(tmp_path, "backup", str(target)).returncode == 1  # never overwrites
    mistyped = tmp_path / "data" / "parley-typo.db"
    missing = cli(tmp_path, "backup", str(tmp_path / "other.db"), PARLEY_DATABASE=str(mistyped))
    assert missing.returncode == 1 and "no database to back up" in missing.stderr
    assert not mistyped.exists() and not (tmp_path / "other.db").exists()
    for nowhere in ("/proc/nope/backup.db", str(tmp_path / "backup.db" / "inside.db")):
        refused = cli(tmp_path, "backup", nowhere)
        assert refused.returncode == 1
        assert refused.stderr.strip().count("\n") == 0 and "cannot write a backup" in refused.stderr, refused.stderr


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA synchronous=OFF")  # a commit every few microseconds
while True:  # until killed: a busy server's steady commits
    conn.execute("INSERT INTO filler VALUES (randomblob(100))")
"""


def filled_database(tmp_path: Path, megabytes: int) -> Path:
    database = tmp_path / "data" / "parley.db"
    database.parent.mkdir()
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE filler (x BLOB)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO filler SELECT randomblob(4000) FROM n",
        (megabytes * 250,),
    )
    conn.close()
    return database


def rows(database: Path) -> int:
    conn = sqlite3.connect(database)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM filler").fetchone()[0])
    finally:
        conn.close()


def test_backup_finishes_while_the_database_is_written_all_the_time(tmp_path: Path) -> None:
    """In one step, one snapshot: a backup in steps started over at every write between two of them, and under
    steady writes (a busy server, here another process) it never finished."""
    database = filled_database(tmp_path, 100)  # a backup in steps of 1024 pages took twenty-five
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(database)])
    try:
        deadline = time.monotonic() + 10
        while rows(database) < 25_000 + 100 and time.monotonic() < deadline:  # writing all the time by now
            time.sleep(0.01)
        backup = cli(tmp_path, "backup", str(tmp_path / "copy.db"))
        before_the_end = rows(database)
    finally:
        writer.kill()
        writer.wait()
    assert backup.returncode == 0, backup.stderr
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert 25_000 < copy.execute("SELECT COUNT(*) FROM filler").fetchone()[0] < before_the_end
    copy.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db")] == []  # no partial file


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_backup_stopped_by_a_signal_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals) -> None:
    filled_database(tmp_path, 100)
    backup = subprocess.Popen(
        [PARLEY, "backup", str(tmp_path / "copy.db")], cwd=tmp_path, env=env_for(tmp_path), stderr=subprocess.PIPE
    )
    wait_for_its_partial_file(tmp_path, backup)
    backup.send_signal(sig)
    _, stderr = backup.communicate(timeout=60)
    assert backup.returncode == 128 + sig, stderr
    assert b"interrupted" in stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db") or p.name == "copy.db"] == []


def test_a_backup_under_nohup_ignores_a_hang_up(tmp_path: Path) -> None:
    filled_database(tmp_path, 100)
    backup = subprocess.Popen(
        [PARLEY, "backup", str(tmp_path / "copy.db")],
        cwd=tmp_path,
        env=env_for(tmp_path),
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    wait_for_its_partial_file(tmp_path, backup)
    backup.send_signal(signal.SIGHUP)
    _, stderr = backup.communicate(timeout=60)
    assert backup.returncode == 0, stderr
    assert (tmp_path / "copy.db").is_file()


def wait_for_its_partial_file(tmp_path: Path, backup: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".copy.db.partial-") for p in tmp_path.iterdir()):
        assert backup.poll() is None and time.monotonic() < deadline, "the backup never started its copy"
        time.sleep(0.002)


def test_a_backup_is_renamed_into_place_where_hard_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAT, exFAT and many SMB or FUSE mounts refuse link(2): the finished copy is renamed instead, never over a
    file that appeared at PATH meanwhile."""
    from app import cli as parley_cli

    def no_links(source: object, target: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(parley_cli.os, "link", no_links)
    partial, target = tmp_path / ".b.db.partial-x", tmp_path / "b.db"
    partial.write_bytes(b"copy")
    parley_cli._put_in_place(partial, target)
    assert target.read_bytes() == b"copy" and not partial.exists()
    partial.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        parley_cli._put_in_place(partial, target)
    assert target.read_bytes() == b"copy"


def test_a_bad_setting_stops_the_command_with_one_line(tmp_path: Path) -> None:
    result = cli(tmp_path, "migrate", PARLEY_PORT="0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "PARLEY_PORT" in result.stderr


def test_a_malformed_public_url_in_dot_env_stops_serve_with_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PARLEY_PUBLIC_URL=http://exa mple.com\n")
    result = cli(tmp_path, "serve", "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "PARLEY_PUBLIC_URL" in result.stderr
    assert not (tmp_path / "data").exists()


BAD_DATABASES = ["/proc/nope/parley.db", "a-directory", "not-a-database.txt"]


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        *((("serve",), bad) for bad in BAD_DATABASES),
        *((("keys", "list", "--org", "acme"), bad) for bad in BAD_DATABASES[1:]),  # the first is missing: exit 1
        (("migrate",), "a-directory"),
        (("agents", "sync"), "/proc/nope/parley.db"),
        (("backup", "b.db"), "not-a-database.txt"),
    ],
)
def test_a_database_that_cannot_be_opened_stops_the_command_with_one_line(
    tmp_path: Path, command: tuple[str, ...], bad: str
) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "not-a-database.txt").write_text("hello\n" * 100)
    args = [*command, "--port", str(free_port())] if command == ("serve",) else command
    result = cli(tmp_path, *args, PARLEY_DATABASE=bad)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "PARLEY_DATABASE" in result.stderr and bad in result.stderr
    assert not (tmp_path / "b.db").exists()


def made_read_only(database: Path) -> None:
    """Mark a database read-only in its own header (a file-format write version SQLite does not know, which it opens
    for reading only): as a file without write permission is, but for root too, whom permissions do not stop."""
    with database.open("r+b") as file:
        file.seek(18)
        file.write(bytes([3]))


@pytest.mark.parametrize(
    "command", [("keys", "create", "--org", "acme"), ("keys", "revoke", "KEY_ID"), ("agents", "sync")]
)
def test_a_database_that_cannot_be_written_stops_a_command_that_writes_with_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    assert cli(tmp_path, "keys", "create", "--org", "acme").returncode == 0
    key_id = cli(tmp_path, "keys", "list", "--org", "acme").stdout.split()[0]
    made_read_only(tmp_path / "data" / "parley.db")
    result = cli(tmp_path, *[key_id if part == "KEY_ID" else part for part in command])
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "PARLEY_DATABASE" in line and "readonly" in line, result.stderr
    assert result.stdout == ""
    assert cli(tmp_path, "keys", "list", "--org", "acme").stdout.split()[0] == key_id  # reads still work


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"PARLEY_DATABASE: /srv/parley/parley.db\n", "line 1 is not NAME=value (it starts with PARLEY_DATABASE)"),
        ("# caf\u00e9\nPARLEY_PORT=9100\n".encode("latin-1"), "must be UTF-8 text"),  # an editor's legacy encoding
        ("PARLEY_PORT=9100\n".encode("utf-16"), "must be UTF-8 text"),  # PowerShell 5's `>` writes UTF-16
    ],
)
def test_a_dot_env_that_cannot_be_read_whole_stops_the_command_with_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    """A line python-dotenv cannot parse used to be skipped with a warning, leaving its variable at the default (here:
    a new, empty database); an undecodable file was a traceback."""
    (tmp_path / ".env").write_bytes(content)
    result = cli(tmp_path, "migrate")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and ".env" in line and reason in line, result.stderr
    assert "/srv/parley" not in line  # a value is never shown: it may be a secret
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", [("migrate",), ("serve",)])
def test_a_database_a_newer_version_migrated_stops_the_command_with_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    assert cli(tmp_path, "migrate").returncode == 0
    database = tmp_path / "data" / "parley.db"
    with sqlite3.connect(database) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, '9999_from_the_future')")
    args = [*command, "--port", str(free_port())] if command == ("serve",) else command
    result = cli(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "PARLEY_DATABASE" in result.stderr and "newer version of Parley" in result.stderr


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (("--host", "not a host!"), {}, "--host"),
        ((), {"PARLEY_HOST": "256.1.1.1"}, "PARLEY_HOST"),
        ((), {"PARLEY_HOST": "192.0.2.1"}, "PARLEY_HOST"),  # TEST-NET-1: never this machine's
    ],
)
def test_serve_refuses_a_host_it_cannot_listen_on_with_one_line(
    tmp_path: Path, flags: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    result = cli(tmp_path, "serve", "--port", str(free_port()), *flags, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and named in result.stderr
    assert "serving" not in result.stdout and not (tmp_path / "data").exists()  # nothing ran


@pytest.mark.parametrize("from_flag", [True, False])
def test_serve_refuses_a_port_in_use_with_one_line(tmp_path: Path, from_flag: bool) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        flags, env = (("--port", port), {}) if from_flag else ((), {"PARLEY_PORT": port})
        result = cli(tmp_path, "serve", *flags, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert ("--port" if from_flag else "PARLEY_PORT") in result.stderr and port in result.stderr
    assert "serving" not in result.stdout and not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_serve_holds_its_port_from_the_check_until_it_serves_on_it(tmp_path: Path) -> None:
    """The port is checked by binding it, and that socket is the one the server listens on: no other process
    can take the port while start-up (migrations, the agents' sync) runs."""
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [PARLEY, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "Parley serving on" in process.stdout.readline()  # printed before start-up runs
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers, uvicorn's included
            other.bind(("127.0.0.1", port))
            other.listen()
        assert refused.value.errno == errno.EADDRINUSE
        wait_until_ready(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


@pytest.mark.parametrize("command", [("serve",), ("agents", "sync")])
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "not found"),
        ("this is not toml\n", "Expected '='"),
        (b"\xff\xfe agents", "utf-8"),
        ("", "no [[agents]] entries"),  # empty or cut off: it would retire every managed agent
        ('[[agents]]\nslug = "a"\nname = "A"\ntoolSecret = "notawhsec"\n', "toolSecret must be whsec_"),
        ('[[agents]]\nslug = "a"\nname = "A"\nopeningMessage = "Hi"\n', "openingMessage: managed agents have"),
        ('[[agents]]\nslug = "a"\nname = "A"\n[[agents]]\nslug = "a"\nname = "B"\n', "the slug 'a'"),
        (
            '[[agents]]\nslug = "a"\nname = "A"\n[[agents.tools]]\ntype = "webhook"\nname = "t"\ndescription = "d"\n'
            'parameters = {type = "object"}\nurl = "https://10.0.0.1/t"\n',
            "tools.0.url: must not point to a private",
        ),
    ],
)
def test_an_agents_file_that_is_missing_or_malformed_stops_the_command_with_one_line_naming_the_variable(
    tmp_path: Path, command: tuple[str, ...], content: str | bytes | None, reason: str
) -> None:
    path = tmp_path / "agents.toml"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    args = [*command, "--port", str(free_port())] if command == ("serve",) else command
    result = cli(tmp_path, *args, PARLEY_AGENTS_FILE=str(path))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "PARLEY_AGENTS_FILE" in line and str(path) in line and reason in line
    assert "notawhsec" not in line  # a secret, even a malformed one, is never shown
    assert not (tmp_path / "data").exists()  # checked before the database is touched


def test_a_tool_secret_named_env_colon_may_come_from_dot_env(tmp_path: Path) -> None:
    """SPEC §9: a `.env` file in the working directory is read too; `toolSecret = "env:NAME"` sees it."""
    secret = "whsec_" + base64.b64encode(b"s" * 24).decode()
    (tmp_path / ".env").write_text(f"DOTENV_TOOL_SECRET={secret}\n")
    path = tmp_path / "agents.toml"
    path.write_text('[[agents]]\nslug = "a"\nname = "A"\ntoolSecret = "env:DOTENV_TOOL_SECRET"\n')
    synced = cli(tmp_path, "agents", "sync", PARLEY_AGENTS_FILE=str(path))
    assert synced.returncode == 0, synced.stderr
    listed = cli(tmp_path, "agents", "list", "--secrets", PARLEY_AGENTS_FILE=str(path))
    assert secret in listed.stdout


def test_an_agents_file_that_says_agents_is_empty_retires_every_managed_agent(tmp_path: Path) -> None:
    assert cli(tmp_path, "agents", "sync").returncode == 0
    path = tmp_path / "agents.toml"
    path.write_text("agents = []\n")
    synced = cli(tmp_path, "agents", "sync", PARLEY_AGENTS_FILE=str(path))
    assert synced.returncode == 0 and "synced 0 managed agent(s)" in synced.stdout, synced.stderr
    assert cli(tmp_path, "agents", "list", PARLEY_AGENTS_FILE=str(path)).stdout == ""


def test_the_default_agents_file_is_found_where_make_run_starts(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    del env["PARLEY_AGENTS_FILE"]
    synced = subprocess.run(
        [PARLEY, "agents", "sync"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert synced.returncode == 0, synced.stderr
    assert "recall-sms" in synced.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("phase", ["draining requests", "stopping background work"])
def test_a_second_ctrl_c_ends_the_server_at_once_with_one_line_keeping_what_it_acknowledged(
    server: Any, phase: str
) -> None:
    """A second Ctrl-C while the server stops, whether it waits for a request (uvicorn's drain) or for a webhook
    attempt (the scheduler's grace), ends it at once and by SIGINT, as a SIGTERM stop ends by SIGTERM: one log line,
    no traceback (uvicorn cancelled the shutdown, and the cancelled clean-up logged one), and every write it had
    answered is in the database (uvicorn used to leave the database's threads alive for ever, too)."""
    base, process, tmp_path = server
    port = int(base.rsplit(":", 1)[1])
    key = (tmp_path / "data" / "dev-api-key").read_text().strip()
    log = tmp_path / "server.log"
    with (
        Receiver(lambda _: Reply(delay=10.0)) as slow,
        socket.create_connection(("127.0.0.1", port), timeout=5) as held,
    ):
        if phase == "stopping background work":
            assert call("POST", base + "/v1/webhooks", key, {"url": slow.url, "events": ["*"]})[0] == 201
        status, created = call("POST", base + "/v1/sms-conversations", key, SEED_CREATE)
        assert status == 201, created
        if phase == "draining requests":  # a request whose body never ends
            held.sendall(
                b"POST /v1/sms-conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {key}\r\n".encode()
                + b'Content-Length: 170\r\n\r\n{"toNu'
            )
        else:
            deadline = time.monotonic() + 5
            while not slow.received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slow.received  # the attempt is on the wire: the stop waits for it
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None, log.read_text()[-3000:]  # still stopping
        before = log.read_text()
        second = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
        waited = time.monotonic() - second
    output = log.read_text()
    assert process.returncode == -signal.SIGINT, output[-3000:]
    assert waited < 1.0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (line,) = output[len(before) :].splitlines()
    assert "Ctrl-C while stopping" in line
    with sqlite3.connect(tmp_path / "data" / "parley.db") as conn:
        stored = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", [created["data"]["conversationId"]]
        )
        assert stored.fetchone()[0] == 1  # the opening text it answered 201 for
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_port_flag_takes_plain_digits_as_parley_port_does(tmp_path: Path) -> None:
    result = cli(tmp_path, "serve", "--port", "52_178")
    assert result.returncode == 2 and "--port" in result.stderr and "whole number" in result.stderr
    assert not (tmp_path / "data").exists()
