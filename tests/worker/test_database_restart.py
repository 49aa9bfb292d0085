"""PostgreSQL restarted under a running service: web and worker reconnect by themselves, no task is lost.

The service runs entirely as subprocesses (gunicorn + qcluster) on a private PostgreSQL server this
test creates with initdb and restarts with pg_ctl; the shared test database is never touched.
"""
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT, wait_for
from tests.worker.conftest import FINISHED

pytestmark = pytest.mark.worker

PG_BIN_DIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
TASK = {"height": 128, "width": 128, "video_duration": 2, "infer_steps": 30}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port (run as the postgres user when we are root)."""

    def __init__(self):
        self.bin_dir = Path(PG_BIN_DIRS[-1])
        self.root = Path(tempfile.mkdtemp(prefix="lightx2v-pg-"))
        self.data_dir = self.root / "data"
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "--no-sync")
        self._pg_ctl("start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "lightx2v")

    def _pg_ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.root / "log"), "-w", *args, action)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            self._pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/lightx2v"


@pytest.fixture
def private_postgres():
    if not PG_BIN_DIRS:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PrivatePostgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def service(private_postgres, tmp_path):
    """gunicorn + one qcluster on the private server; yields (base_url, token)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings",
        "DATABASE_URL": private_postgres.url,
        "LIGHTX2V_OUTPUT_ROOT": str(tmp_path / "outputs"),
        "LIGHTX2V_LEASE_S": "30",
        "LIGHTX2V_HEARTBEAT_S": "0.5",
    }

    def manage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    manage("migrate", "--noinput")
    manage("createcachetable")
    token = manage("create_api_token", "restart-test")
    port = _free_port()
    logs = [(tmp_path / name).open("wb") for name in ("gunicorn.log", "qcluster.log")]
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "lightx2v_site.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1", "--threads", "4"],
        cwd=REPO_ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"], cwd=REPO_ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{base_url}/v1/service/status", token) == 200, timeout=60, what="gunicorn up")
    yield base_url, token
    for process in (worker, web):
        process.terminate()
    for process in (worker, web):
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    for log in logs:
        log.close()


def _get(url: str, token: str) -> int | None:
    try:
        return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code
    except requests.ConnectionError:
        return None


def test_tasks_survive_a_database_restart_mid_run(private_postgres, service):
    base_url, token = service
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    task_ids = []
    for index in range(6):
        response = session.post(f"{base_url}/v1/tasks/video", json={"prompt": f"restart {index}", **TASK}, timeout=10)
        assert response.status_code == 201, response.text
        task_ids.append(response.json()["task_id"])
    status_codes: set[int] = set()

    def status(task_id: str) -> dict | None:
        response = session.get(f"{base_url}/v1/tasks/{task_id}/status", timeout=10)
        status_codes.add(response.status_code)
        return response.json() if response.status_code == 200 else None

    wait_for(lambda: (body := status(task_ids[0])) and body["progress"] > 0, timeout=120, what="first task running")
    private_postgres.restart()

    finals = {
        task_id: wait_for(
            lambda task_id=task_id: (body := status(task_id)) and body["status"] in FINISHED and body,
            timeout=240,
            what=f"task {task_id} to finish after the restart",
            interval=0.2,
        )
        for task_id in task_ids
    }

    assert [finals[task_id]["status"] for task_id in task_ids] == ["succeed"] * 6, finals
    assert all(final["attempt_count"] == 1 for final in finals.values())
    assert status_codes <= {200, 503}  # a poll during the outage is a retryable 503, never a 500
    # The cluster reports itself alive again (its statistics writes reconnected too).
    wait_for(
        lambda: session.get(f"{base_url}/v1/service/status", timeout=10).json()["live_workers"] >= 1,
        timeout=10,  # django-q2 alone recovers only at its next scheduler run, up to 30 s later
        what="the worker to be counted live again",
    )
