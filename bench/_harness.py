"""Shared set-up for the HTTP benchmarks: a fresh PostgreSQL database, the tiny model, gunicorn, qcluster.

``Service`` drops and recreates the database ``bench_<name>``, migrates it, builds the tiny
model in a temp ``LIGHTX2V_VAR_DIR`` and starts every process in its own process group, so
``stop()`` (also run at exit, on SIGINT/SIGTERM and from ``with``) ends each of them and
their children. ``Client`` is a tiny keep-alive ``http.client`` wrapper that times requests.
"""
from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
GUNICORN = str(REPO_ROOT / ".venv" / "bin" / "gunicorn")
PG = ["-h", "127.0.0.1", "-U", "postgres"]
FINISHED = {"succeed", "failed", "cancelled"}
IDLE_OR_COUNTED_TWICE = ("idle", "iowait", "guest", "guest_nice")  # psutil.cpu_times() fields left out of "busy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max (nearest rank) of ``values``; zeros when empty."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {"p50": statistics.median(ordered), "p95": rank(0.95), "p99": rank(0.99), "max": ordered[-1]}


class Client:
    """One connection to the service as one user; ``request`` returns ``(status, body, seconds)``.

    Keeps the connection alive when the server allows it. A request on a reused connection that
    the server had already closed (keep-alive timeout) is sent once more on a fresh one and
    counted in ``retries``: the first copy never reached a view.
    """

    def __init__(self, base_url: str, token: str | None = None):
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.connection: http.client.HTTPConnection | None = None
        self.retries = 0

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None, float]:
        headers = dict(self.headers)
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        for attempt in (0, 1):
            reused = self.connection is not None
            connection = self.connection or http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                connection.request(method, path, body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                self.connection = None
                if attempt or not reused:
                    raise
                self.retries += 1
        elapsed = time.perf_counter() - started
        self.connection = None if response.will_close else connection
        if response.will_close:
            connection.close()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = {"raw": data[:200].decode(errors="replace")}
        return response.status, parsed, elapsed

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Service:
    """The whole service on loopback against its own database; see the module docstring."""

    def __init__(self, name: str, extra_env: dict[str, str] | None = None):
        self.database = f"bench_{name}"
        self.var_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.model_dir = self.var_dir / "tiny-model"
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{self.database}",
            "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings",
            "SECRET_KEY": "bench-secret-key-not-for-production",
            "DEBUG": "0",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LIGHTX2V_DEVICE": "cpu",
            "LIGHTX2V_VAR_DIR": str(self.var_dir),
            "LIGHTX2V_MODEL_PATH": str(self.model_dir / "t2v"),
            "LIGHTX2V_I2V_MODEL_PATH": str(self.model_dir / "i2v"),
            "LIGHTX2V_MAX_UNFINISHED_PER_USER": "1000000",
            "LIGHTX2V_MAX_QUEUED": "1000000",
            "LIGHTX2V_SHUTDOWN_GRACE_S": "3",  # a worker stopped mid-task hands it back soon: quick teardown
            **(extra_env or {}),
        }
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.base_url = ""
        self._db = None
        atexit.register(self.stop)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.stop()
        sys.exit(128 + signum)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def manage(self, *args: str) -> str:
        """``manage.py ARGS`` against this service's database; its stdout (raises on failure)."""
        done = subprocess.run(
            [PYTHON, "manage.py", *args], cwd=REPO_ROOT, env=self.env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def prepare(self) -> None:
        """Fresh database (dropped first, so runs repeat), schema, cache table, tiny model."""
        subprocess.run(["dropdb", *PG, "--if-exists", "--force", self.database], check=True, capture_output=True)
        subprocess.run(["createdb", *PG, self.database], check=True, capture_output=True)
        self.manage("migrate", "--noinput")
        self.manage("createcachetable")
        self.manage("build_tiny_model", str(self.model_dir))

    def tokens(self, usernames: list[str]) -> dict[str, str]:
        """One new API token per user (users created as needed), in one Django start-up."""
        script = (
            "from django.contrib.auth import get_user_model\n"
            "from tasks_app.models import ApiToken\n"
            f"for name in {usernames!r}:\n"
            "    user, _ = get_user_model().objects.get_or_create(username=name)\n"
            "    print('token', name, ApiToken.issue(user=user)[1])\n"
        )
        rows = [line.split() for line in self.manage("shell", "-c", script).splitlines()]
        return {row[1]: row[2] for row in rows if len(row) == 3 and row[0] == "token"}

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Rows of one autocommit query on this service's database (a connection of the bench's own)."""
        import psycopg

        if self._db is None:
            self._db = psycopg.connect(f"host=127.0.0.1 user=postgres dbname={self.database}", autocommit=True)
        cursor = self._db.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.var_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append((name, process))
        return process

    def start_web(self, workers: int = 2, threads: int = 1) -> str:
        """gunicorn on a free loopback port (gthread when ``threads`` > 1); waits for the health check."""
        port = free_port()
        command = [GUNICORN, "lightx2v_site.wsgi", "-w", str(workers), "-b", f"127.0.0.1:{port}",
                   "--graceful-timeout", "5", "--log-level", "warning"]  # fmt: skip
        if threads > 1:
            command += ["--worker-class", "gthread", "--threads", str(threads)]
        self._spawn("gunicorn", command, self.env)
        self.base_url = f"http://127.0.0.1:{port}"
        self.wait_for(lambda: self._health() is not None, timeout=60, what="gunicorn up")
        return self.base_url

    def start_workers(self, processes: int = 1, log_level: str = "INFO", poll_s: float | None = None) -> None:
        """One ``manage.py qcluster`` with ``processes`` workers; waits until they report live.

        ``poll_s`` runs it with ``bench._settings``: the project's settings with that django-q2 poll interval.
        """
        env = {**self.env, "LIGHTX2V_WORKERS": str(processes), "LOG_LEVEL": log_level}
        if poll_s is not None:
            env.update(DJANGO_SETTINGS_MODULE="bench._settings", BENCH_Q_POLL=str(poll_s))
        self._spawn("qcluster", [PYTHON, "manage.py", "qcluster"], env)
        self.wait_for(lambda: (self._health() or 0) >= processes, timeout=90, what="workers live")

    def _health(self) -> int | None:
        try:
            status, body, _ = Client(self.base_url).request("GET", "/v1/service/status")
        except OSError:
            return None
        return body["live_workers"] if status == 200 else None

    def wait_for(self, condition, *, timeout: float, what: str, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
            result = condition()
            if result:
                return result
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def log(self, name: str) -> str:
        path = self.var_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_times(self, name: str, pattern: str) -> list[tuple[float, re.Match]]:
        """Epoch time and match of each line of ``name``'s log whose message matches ``pattern``."""
        found = []
        for line in self.log(name).splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            match = re.search(pattern, line)
            if stamp and match:
                when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000
                found.append((when, match))
        return found

    def stop(self, keep_files: bool = False) -> None:
        """SIGTERM each process group, SIGKILL what is left after 15 s; remove the temp folder."""
        for _, process in self.processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        for _, process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            _signal_group(process, signal.SIGKILL)  # stragglers of a group whose leader already left
        self.processes.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
        if not keep_files:
            shutil.rmtree(self.var_dir, ignore_errors=True)


class CpuMeter:
    """CPU seconds spent during a phase by the bench process, gunicorn's and qcluster's process trees,
    the service's PostgreSQL backends, and everything else on the machine (other users of these cores).
    ``service`` is gunicorn + qcluster."""

    GROUPS = ("gunicorn", "qcluster", "postgres")

    def __init__(self, service: Service):
        self.service = service

    def _by_pid(self) -> dict[str, dict[int, float]]:
        import psutil

        pids: dict[str, list[int]] = {group: [] for group in self.GROUPS}
        for name, process in self.service.processes:
            root = psutil.Process(process.pid)
            pids[name] += [member.pid for member in (root, *root.children(recursive=True))]
        backends = self.service.sql(  # the bench's own connection is not the service's
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.service.database,)
        )
        pids["postgres"] = [pid for (pid,) in backends]
        groups: dict[str, dict[int, float]] = {group: {} for group in self.GROUPS}
        for group, members in pids.items():
            for pid in members:
                try:
                    times = psutil.Process(pid).cpu_times()
                    groups[group][pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        return groups

    def snapshot(self) -> dict:
        import psutil

        machine = psutil.cpu_times()
        return {
            "wall": time.perf_counter(),
            "bench": time.process_time(),
            # guest time is already counted in user time on Linux
            "machine": sum(machine) - sum(getattr(machine, name, 0.0) for name in IDLE_OR_COUNTED_TWICE),
            **self._by_pid(),
        }

    def since(self, before: dict) -> dict[str, float]:
        """Seconds of CPU per consumer between ``before`` and now (processes new since count in full)."""
        now = self.snapshot()
        used = {key: now[key] - before[key] for key in ("wall", "bench", "machine")}
        for group in self.GROUPS:
            used[group] = sum(cpu - before[group].get(pid, 0.0) for pid, cpu in now[group].items())
        used["service"] = used["gunicorn"] + used["qcluster"]
        used["others"] = max(0.0, used["machine"] - used["bench"] - used["service"] - used["postgres"])
        return used


def describe_cpu(used: dict[str, float]) -> str:
    share = {key: used[key] / used["wall"] for key in ("gunicorn", "qcluster", "postgres", "bench", "others")}
    return (f"CPU cores busy over {used['wall']:.1f} s: gunicorn {share['gunicorn']:.2f},"
            f" qcluster {share['qcluster']:.2f}, postgres {share['postgres']:.2f}, bench client {share['bench']:.2f},"
            f" other processes {share['others']:.2f} (of {os.cpu_count()})")  # fmt: skip


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
