"""Shared fixtures: the tiny Wan model, users with tokens, HTTP clients, real worker processes."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_APP_NAME = "lightx2v-test-qcluster"
MODEL_SETTINGS = {"t2v": "LIGHTX2V_MODEL_PATH", "i2v": "LIGHTX2V_I2V_MODEL_PATH"}


@pytest.fixture(scope="session", autouse=True)
def tiny_model_dirs():
    """Build the tiny T2V + I2V pair and LoRAs where the test settings point (once per session)."""
    from django.conf import settings

    if not getattr(settings, "LIGHTX2V_MODEL_PATH", ""):
        return None  # plain-python runs (tests/inference) build their own
    from django.core.management import call_command

    call_command("build_tiny_model", Path(settings.LIGHTX2V_MODEL_PATH).parent, stdout=io.StringIO())
    return {kind: Path(getattr(settings, setting)) for kind, setting in MODEL_SETTINGS.items()}


@pytest.fixture(autouse=True)
def fresh_estimate_inputs():
    """ETA inputs are cached per process for seconds (``tasks_app.selectors``): no test sees another's."""
    if "tasks_app.selectors" in sys.modules:
        sys.modules["tasks_app.selectors"].forget_estimate_inputs()


@pytest.fixture
def make_user(db):
    from django.contrib.auth import get_user_model

    def make(username: str):
        return get_user_model().objects.create_user(username=username)

    return make


@pytest.fixture
def make_api(make_user):
    """``make_api(username)`` → a DRF APIClient authenticated with a fresh Bearer token of that user."""
    from rest_framework.test import APIClient

    from tasks_app.models import ApiToken

    def make(username: str):
        user = make_user(username)
        _, raw_key = ApiToken.issue(user=user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
        client.user, client.raw_key = user, raw_key
        return client

    return make


@pytest.fixture
def api(make_api):
    return make_api("alice")


@pytest.fixture
def input_root(settings, tmp_path):
    """An input folder allowed for ``image_path`` (replaces the configured ones for this test)."""
    root = tmp_path / "inputs"
    root.mkdir()
    settings.LIGHTX2V_INPUT_ROOTS = [root]
    return root


def png_bytes(width: int = 40, height: int = 24, color=(200, 30, 60)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class WorkerProcesses:
    """Real ``manage.py qcluster`` subprocesses on the test database; stopped at teardown."""

    def __init__(self, database_name: str, log_dir: Path):
        self.database_name = database_name
        self.log_dir = log_dir
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(
        self, count: int = 1, workers_each: int = 1, wait_ready: bool = True, extra_env: dict | None = None
    ) -> None:
        """Start ``count`` qclusters of ``workers_each`` processes; ``extra_env`` overrides settings for them."""
        from tasks_app import selectors

        env = dict(os.environ)
        env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{self.database_name}"
        env["LIGHTX2V_WORKERS"] = str(workers_each)
        env["PGAPPNAME"] = WORKER_APP_NAME  # libpq names their sessions, so teardown can wait for them to end
        env["DJANGO_SETTINGS_MODULE"] = "lightx2v_site.settings"  # the environment is already complete
        env.update(extra_env or {})
        for _ in range(count):
            log_path = self.log_dir / f"qcluster-{len(self.processes)}.log"
            process = subprocess.Popen(
                [sys.executable, "manage.py", "qcluster"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.processes.append((process, log_path))
        if wait_ready:
            wait_for(lambda: selectors.live_worker_count() >= count * workers_each, timeout=60, what="workers up")

    def stop(self, timeout: float = 30) -> list[int]:
        """SIGTERM each qcluster (as docker or systemd would); SIGKILL what is left after ``timeout``.

        Returns the pids that had to be killed.
        """
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        killed = []
        for process, _ in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed.append(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # worker processes a dead sentinel left behind
            process.wait()
        self.processes.clear()
        self._wait_for_their_connections_to_close()
        return killed

    @staticmethod
    def _wait_for_their_connections_to_close(timeout: float = 10) -> None:
        """PostgreSQL ends a killed client's session a moment later; until then the test database cannot be dropped."""
        from django.db import connection

        def others() -> int:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                    [WORKER_APP_NAME],
                )
                return cursor.fetchone()[0]

        deadline = time.monotonic() + timeout
        while others() and time.monotonic() < deadline:
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for _, path in self.processes)


@pytest.fixture
def workers(transactional_db, tmp_path, request):
    """Start real workers with ``workers.start(count)``; they share the test database with the test."""
    from django.db import connection

    pool = WorkerProcesses(connection.settings_dict["NAME"], tmp_path)
    yield pool
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(pool.logs())
    pool.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def wait_for(condition, *, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
