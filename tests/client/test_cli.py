"""``python -m lightx2v_client`` as a user runs it: a live server, a real worker, the tiny model, MP4s on disk."""
import re
import signal
import uuid

import pytest
import requests

from inference.encode import probe_mp4
from lightx2v_client import Client
from tasks_app.models import VideoTask
from tests.client.conftest import TINY, TINY_ARGS, run_cli, start_cli
from tests.conftest import png_bytes

pytestmark = pytest.mark.worker
SUBMITTED = re.compile(r"task ([0-9a-f-]{36}) submitted")


def _task_id(stderr: str) -> str:
    match = SUBMITTED.search(stderr)
    assert match, stderr
    return match.group(1)


def _assert_video(path, *, width: int, height: int, frames: int) -> None:
    probe = probe_mp4(path)
    assert (probe["codec"], probe["fps"]) == ("h264", 16)
    assert (probe["width"], probe["height"], probe["frames"]) == (width, height, frames)


def test_generate_t2v_and_i2v_then_status_download_and_ctrl_c_cancels(workers, live_server, token, tmp_path):
    workers.start()
    server = live_server.url
    t2v_out = tmp_path / "t2v.mp4"
    t2v = run_cli(
        server, token, "generate", "--prompt", "a red fox in snow", *TINY_ARGS, "--seed", "7",
        "--poll-interval", "0.05", "--out", str(t2v_out),
    )  # fmt: skip
    assert t2v.returncode == 0, t2v.stderr
    assert t2v.stdout.strip() == str(t2v_out)
    assert "[" + "#" * 30 + "] 100%" in t2v.stderr and "completed" in t2v.stderr
    _assert_video(t2v_out, width=64, height=64, frames=17)
    assert not list(tmp_path.glob(".*.part"))  # the temp file was renamed, not left behind

    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(64, 64))
    i2v_out = tmp_path / "out" / "i2v.mp4"  # a folder that does not exist yet
    i2v = run_cli(
        "http://unused.invalid", token, "--server", server, "generate", "--prompt", "the cat turns",
        "--image", str(image), *TINY_ARGS, "--out", str(i2v_out), "--poll-interval", "0.05",
    )  # fmt: skip
    assert i2v.returncode == 0, i2v.stderr
    _assert_video(i2v_out, width=64, height=64, frames=17)
    i2v_id = _task_id(i2v.stderr)
    assert VideoTask.objects.get(task_id=i2v_id).task_type == "i2v"

    status = run_cli(server, token, "status", i2v_id)
    assert status.returncode == 0 and '"status": "succeed"' in status.stdout
    again = tmp_path / "again.mp4"
    download = run_cli(server, token, "download", i2v_id, "--out", str(again))
    assert download.returncode == 0, download.stderr
    assert again.read_bytes() == i2v_out.read_bytes()

    # A long task: the bar shows steps and an ETA; Ctrl-C cancels it on the server, exit 130. Eight
    # fragments make it long enough (~25 s) that a slow reader still interrupts it while it runs.
    long_run = start_cli(
        server, token, "generate", "--prompt", "long", "--height", "256", "--width", "256", "--duration", "3",
        "--steps", "50", "--fragments", "8", "--poll-interval", "0.05", "--out", str(tmp_path / "never.mp4"),
    )  # fmt: skip
    lines = []
    for line in long_run.stderr:
        lines.append(line)
        if re.search(r"step \d+/50 +ETA \d\d:\d\d", line):
            break
    long_run.send_signal(signal.SIGINT)
    _, rest = long_run.communicate(timeout=30)
    stderr = "".join(lines) + rest
    assert long_run.returncode == 130, stderr
    long_id = _task_id(stderr)
    assert f"task {long_id} cancelled" in stderr
    assert VideoTask.objects.get(task_id=long_id).status == "cancelled"
    assert not (tmp_path / "never.mp4").exists()


def test_a_failing_task_exits_3_with_the_reason(workers, live_server, token, tmp_path):
    workers.start(extra_env={"LIGHTX2V_MODEL_PATH": "/nonexistent"})
    server = live_server.url
    result = run_cli(server, token, "generate", "--prompt", "doomed", *TINY_ARGS, "--out", str(tmp_path / "x.mp4"))
    assert result.returncode == 3, result.stderr
    task_id = _task_id(result.stderr)
    assert re.search(rf"error: task {task_id} failed: ModelLoadError.*/nonexistent", result.stderr)
    assert not (tmp_path / "x.mp4").exists() and not list(tmp_path.glob(".*.part"))

    download = run_cli(server, token, "download", task_id, "--out", str(tmp_path / "x.mp4"))
    assert download.returncode == 3 and f"task {task_id} is failed: ModelLoadError" in download.stderr
    cancel = run_cli(server, token, "cancel", task_id)
    assert cancel.returncode == 2 and "error:" in cancel.stderr and "(HTTP 409)" in cancel.stderr


def test_bad_input_exits_2_with_the_servers_message_and_no_server_exits_4(live_server, token, tmp_path):
    server, out = live_server.url, str(tmp_path / "x.mp4")
    bad_size = run_cli(server, token, "generate", "--prompt", "p", "--height", "70", "--width", "64", "--out", out)
    assert bad_size.returncode == 2
    assert "error: height: must be a multiple of 16 (HTTP 400)" in bad_size.stderr
    bad_steps = run_cli(server, token, "generate", "--prompt", "p", "--steps", "0", "--out", out)
    assert bad_steps.returncode == 2 and "infer_steps: " in bad_steps.stderr

    unknown = run_cli(server, token, "status", str(uuid.uuid4()))
    assert unknown.returncode == 2 and "Not found. (HTTP 404)" in unknown.stderr
    wrong_token = run_cli(server, "not-a-token", "status", str(uuid.uuid4()))
    assert wrong_token.returncode == 2 and "(HTTP 401)" in wrong_token.stderr
    no_token = run_cli(server, "", "status", str(uuid.uuid4()))
    assert no_token.returncode == 2 and "LIGHTX2V_TOKEN" in no_token.stderr
    no_image = run_cli(server, token, "generate", "--prompt", "p", "--image", str(tmp_path / "no.png"), "--out", out)
    assert no_image.returncode == 2 and "no such file" in no_image.stderr
    assert not VideoTask.objects.exists()

    unreachable = run_cli("http://127.0.0.1:9", token, "--retries", "0", "status", str(uuid.uuid4()))
    assert unreachable.returncode == 4 and "cannot reach the server" in unreachable.stderr


@pytest.mark.parametrize("with_image", [False, True], ids=["json", "multipart"])
def test_a_submit_retried_after_a_lost_answer_makes_one_task(live_server, token, tmp_path, with_image, request):
    client = Client(live_server.url, token, backoff_s=0)
    request.addfinalizer(client.close)  # a kept-alive connection would hold the live server's database session
    real_request, calls = client.session.request, []

    def answer_lost_once(method, url, **kwargs):
        response = real_request(method, url, **kwargs)  # the server did create the task...
        calls.append((response.status_code, kwargs["headers"]["Idempotency-Key"]))
        if len(calls) == 1:
            raise requests.ConnectionError("connection reset")  # ...but the answer never came
        return response

    client.session.request = answer_lost_once
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(32, 32))
    body = client.submit(dict(TINY, prompt="once"), image=image if with_image else None)

    assert [code for code, _ in calls] == [201, 200] and calls[0][1] == calls[1][1]
    assert body["message"] == "Existing task for this Idempotency-Key"
    assert list(VideoTask.objects.values_list("task_id", flat=True)) == [uuid.UUID(body["task_id"])]
