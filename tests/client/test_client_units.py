"""The client's parts without the Django server: error messages, ETA, progress bar, resumed downloads."""
import http.server
import io
import os
import threading
import time

import pytest

from lightx2v_client import Client
from lightx2v_client.api import ApiError, error_message
from lightx2v_client.progress import EtaEstimator, ProgressBar, format_eta


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"detail": "Not found."}, "Not found."),
        ({"height": ["must be a multiple of 16"], "width": ["too big", "odd"]}, "height: must be a multiple of 16; width: too big, odd"),
        ({"task_id": "t", "status": "running", "message": "step 1/4", "progress": 0.2}, "task t is running: step 1/4"),
        ({"task_id": "t", "status": "failed", "message": "failed: ModelLoadError: x"}, "task t is failed: ModelLoadError: x"),
        ({"Idempotency-Key": "bad"}, "Idempotency-Key: bad"),
        (None, "fallback"),
        ({}, "fallback"),
    ],
)  # fmt: skip
def test_error_message_names_the_field_and_the_rule(body, expected):
    assert error_message(body, "fallback") == expected


def test_the_eta_is_the_remaining_progress_at_the_observed_rate():
    now = [100.0]
    eta = EtaEstimator(clock=lambda: now[0])
    assert eta.update(0.0) is None  # queued / loading: no rate yet
    assert eta.update(0.1) is None  # the first movement starts the clock
    now[0] = 104.0
    assert eta.update(0.3) == pytest.approx(14.0)  # 0.2 per 4 s, 0.7 left
    now[0] = 105.0
    assert eta.update(0.3) == pytest.approx(0.7 / (0.2 / 5))  # a stall slows the rate down
    assert eta.update(1.0) == 0.0
    assert (format_eta(None), format_eta(14.2), format_eta(3725)) == ("--:--", "00:14", "1:02:05")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_redraws_one_line():
    stream = FakeTerminal()
    bar = ProgressBar(stream)
    bar.update({"status": "submitted", "progress": 0.0, "message": "queued", "queue_position": 2})
    bar.update({"status": "running", "progress": 0.45, "message": "step 2/4"})
    bar.update({"status": "succeed", "progress": 1.0, "message": "completed"})
    bar.close()
    lines = stream.getvalue().split("\r")
    assert "queued, position 2" in lines[1]
    assert lines[2].startswith("[" + "#" * 13 + "." * 17 + "]  45%  step 2/4  ETA --:--")
    assert lines[3].rstrip().endswith("100%  succeed: completed") and stream.getvalue().endswith("\n")


def test_in_a_log_the_bar_writes_a_line_per_change_only():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for _ in range(3):
        bar.update({"status": "running", "progress": 0.2, "message": "step 1/4"})
    bar.update({"status": "failed", "progress": 0.2, "message": "failed: out of memory"})
    assert stream.getvalue().splitlines()[-1].endswith("20%  failed: out of memory")
    assert len(stream.getvalue().splitlines()) == 2


@pytest.fixture
def flaky_video_server():
    """A stdlib HTTP server whose first download breaks off half-way; later ones honour ``Range``."""
    payload = bytes(range(256)) * 1000
    seen_ranges = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            wanted = self.headers.get("Range")
            seen_ranges.append(wanted)
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            if len(seen_ranges) == 1:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payload, seen_ranges
    server.shutdown()
    server.server_close()


@pytest.fixture
def busy_then_free_server():
    """Answers a submit 429 (too many unfinished tasks, ``Retry-After: 0``) twice, then 201."""
    keys = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            keys.append(self.headers["Idempotency-Key"])
            busy = len(keys) <= 2
            body = b'{"detail": "you have 1 unfinished tasks"}' if busy else b'{"task_id": "t", "status": "submitted"}'
            self.send_response(429 if busy else 201)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", keys
    server.shutdown()
    server.server_close()


def test_a_submit_refused_for_too_many_unfinished_tasks_is_retried_with_the_same_key(busy_then_free_server):
    url, keys = busy_then_free_server
    heard = []
    with Client(url, "token", backoff_s=0, on_retry=lambda why, wait_s: heard.append((why, wait_s))) as client:
        assert client.submit({"prompt": "p"})["task_id"] == "t"
    assert len(keys) == 3 and len(set(keys)) == 1
    assert heard == [("HTTP 429: you have 1 unfinished tasks", 0.0)] * 2  # the CLI prints these
    with Client(url, "token", retries=0) as client:
        keys.clear()
        with pytest.raises(ApiError) as refused:
            client.submit({"prompt": "p"})
    assert refused.value.status_code == 429


def test_a_malformed_server_url_fails_at_once_not_as_an_unreachable_server():
    started = time.monotonic()
    with Client("127.0.0.1:8000", "token", backoff_s=5) as client, pytest.raises(ValueError):
        client.status("t")
    assert time.monotonic() - started < 1  # no retries with backoff


def test_a_download_cut_off_half_way_resumes_with_range_into_the_final_name(flaky_video_server, tmp_path):
    url, payload, seen_ranges = flaky_video_server
    out = tmp_path / "video.mp4"
    with Client(url, "token", backoff_s=0) as client:
        assert client.download("some-task", out) == len(payload)
    assert out.read_bytes() == payload
    resumed_at = int(seen_ranges[1].removeprefix("bytes=").rstrip("-"))  # what arrived whole before the cut
    assert seen_ranges[0] is None and 0 < resumed_at <= len(payload) // 2 and len(seen_ranges) == 2
    assert [path.name for path in tmp_path.iterdir()] == ["video.mp4"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_before_a_rate_is_measured_the_bar_shows_the_servers_eta():
    bar = ProgressBar(io.StringIO())
    line = bar.render({"status": "running", "progress": 0.1, "message": "step 1/10", "eta_s": 42.0})
    assert line.endswith("step 1/10  ETA 00:42")
