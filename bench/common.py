"""Shared pieces of the benchmarks and harnesses: real server processes, keys, wrk, /proc readings.

Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
LUA = Path(__file__).resolve().parent / "lua"
AGENTS_FILE = ROOT / "data" / "agents.toml"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}"


def parley_env(database: str | Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "TWILIO_"))}
    env.update(
        PARLEY_DATABASE=str(database),
        PARLEY_PORT=str(port),
        PARLEY_HOST=HOST,
        PARLEY_AGENTS_FILE=str(AGENTS_FILE),
        PARLEY_SMS_PROVIDER="simulator",
        PARLEY_RATE_LIMIT="1000000",
        PARLEY_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def create_key(database: str | Path, org: str = "bench", cwd: Path | None = None) -> str:
    env = parley_env(database, 0)
    env.pop("PARLEY_PORT")
    out = subprocess.run(
        [str(BIN / "parley"), "keys", "create", "--org", org, "--name", "bench"],
        env=env,
        cwd=cwd or Path(database).parent,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


class Server:
    """A server subprocess (its own session, so a SIGKILL takes only it) with /proc readings."""

    def __init__(self, argv: list[str], *, port: int, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.argv = argv
        self.port = port
        self.env = env
        self.cwd = cwd
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://{HOST}:{port}"

    @classmethod
    def parley(cls, workdir: Path, port: int, log_name: str = "parley.log", **extra: str) -> Server:
        env = parley_env(workdir / "parley.db", port, **extra)
        return cls([str(BIN / "parley"), "serve"], port=port, env=env, cwd=workdir, log=workdir / log_name)

    @classmethod
    def bare(cls, workdir: Path, port: int) -> Server:
        argv = [
            str(BIN / "uvicorn"),
            "bench.bare_app:app",
            "--app-dir",
            str(ROOT),
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        return cls(argv, port=port, env=dict(os.environ), cwd=ROOT, log=workdir / "bare.log")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server on port {self.port} did not become healthy; see {self.log_path}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def _status(self) -> dict[str, str]:
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        return fields

    def rss_mb(self) -> float:
        return int(self._status()["VmRSS"].split()[0]) / 1024

    def peak_rss_mb(self) -> float:
        return int(self._status()["VmHWM"].split()[0]) / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (every thread)."""
        return _cpu_seconds(Path(f"/proc/{self.pid}/stat"))

    def main_thread_cpu_seconds(self) -> float:
        """User + system CPU time of the main thread alone: in uvicorn, the event loop's."""
        return _cpu_seconds(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))

    def bytes_written(self) -> int:
        """Bytes the process has sent to the storage layer (WAL, checkpoints, logs), from /proc/PID/io."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "write_bytes":
                return int(value)
        return 0


def _cpu_seconds(stat_file: Path) -> float:
    stat = stat_file.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def call(method: str, url: str, key: str | None = None, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk is missing: installing Debian's package (apt-get install -y wrk) ...", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "wrk"], check=False, stdout=subprocess.DEVNULL)
    path = shutil.which("wrk")
    if not path:
        subprocess.run([*sudo, "apt-get", "update"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run([*sudo, "apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
        path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk could not be installed; install it (apt-get install wrk) and retry")
    return path


def wrk(
    base: str,
    script: str,
    *,
    connections: int = 32,
    seconds: float = 10.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run wrk with one of bench/lua/*.lua; return its JSON report (latencies in ms)."""
    run_env = dict(os.environ)
    run_env["BENCH_LUA_DIR"] = str(LUA)
    run_env.update(env or {})
    argv = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA / script),
        base,
    ]
    out = subprocess.run(argv, env=run_env, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            report = json.loads(line[len("WRKJSON ") :])
            break
    else:
        raise RuntimeError(f"wrk printed no report:\n{out.stdout}\n{out.stderr}")
    seconds_run = report["duration_us"] / 1e6
    report["rps"] = report["requests"] / seconds_run if seconds_run else 0.0
    report["ok"] = report["requests"] - report["errors_status"]
    for name in ("p50", "p90", "p99", "p999", "max", "mean"):
        report[f"{name}_ms"] = report.pop(f"{name}_us") / 1000
    return report
