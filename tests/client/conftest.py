"""Client-test helpers: a user's raw token, and the CLI run as a subprocess against the live server."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

TINY = {"height": 64, "width": 64, "video_duration": 1, "infer_steps": 2}  # 17 frames, well under a second
TINY_ARGS = ["--height", "64", "--width", "64", "--duration", "1", "--steps", "2"]


@pytest.fixture
def token(make_api) -> str:
    return make_api("alice").raw_key


def cli_env(server: str, token: str) -> dict:
    return {**os.environ, "LIGHTX2V_SERVER": server, "LIGHTX2V_TOKEN": token}


def run_cli(server: str, token: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m lightx2v_client *args`` with the server and token in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "lightx2v_client", *args],
        cwd=REPO_ROOT,
        env=cli_env(server, token),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(server: str, token: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightx2v_client", *args],
        cwd=REPO_ROOT,
        env=cli_env(server, token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
