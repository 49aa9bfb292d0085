"""Webhooks through real workers: one signed delivery per terminal state; a dead receiver is retried
without holding up the queue."""
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks_app import webhooks
from tasks_app.models import WebhookDelivery, WebhookSecret
from tests.conftest import wait_for
from tests.worker.conftest import SMALL, submit

pytestmark = pytest.mark.worker

# The backstop poll is pushed out of the tests' reach: every delivery below is sent because it was
# announced (NOTIFY), was waiting when the worker started, or its retry fell due.
FAST_RETRIES = {
    "LIGHTX2V_WEBHOOK_ALLOW_PRIVATE": "1", "LIGHTX2V_WEBHOOK_BACKOFF_S": "0.2", "LIGHTX2V_WEBHOOK_POLL_S": "600",
}


class Receiver:
    """A local HTTP(S) server that records every POST (headers and body) and answers 200."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def allow_loopback_callbacks(settings):
    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = True


def _verify(headers: dict, body: bytes, secret: str) -> dict:
    expected = hmac.new(secret.encode(), f"{headers['X-LightX2V-Timestamp']}.".encode() + body, hashlib.sha256)
    assert headers["X-LightX2V-Signature"] == f"sha256={expected.hexdigest()}"
    return json.loads(body)


def test_each_terminal_state_is_delivered_once_and_signed(workers, http, receiver):
    cancelled = submit(http, {"prompt": "never mind", **SMALL, "callback_url": receiver.url})
    assert http.delete(f"/v1/tasks/{cancelled}").json()["status"] == "cancelled"
    workers.start(extra_env=FAST_RETRIES)
    succeeded = submit(http, {"prompt": "done", **SMALL, "callback_url": receiver.url})
    assert http.poll_until_finished(succeeded)[0]["status"] == "succeed"

    wait_for(lambda: len(receiver.received) >= 2, timeout=30, what="two deliveries")
    wait_for(lambda: not WebhookDelivery.objects.filter(delivered_at__isnull=True).exists(), timeout=10, what="acks")

    secret = WebhookSecret.objects.get(user__username="alice").secret
    bodies = sorted((_verify(headers, body, secret) for headers, body in receiver.received), key=lambda b: b["event"])
    assert [(b["event"], b["task_id"]) for b in bodies] == [("task.cancelled", cancelled), ("task.succeed", succeeded)]
    assert bodies[1]["file_path"] == f"outputs/videos/{succeeded}.mp4"
    assert len(receiver.received) == 2  # exactly one per terminal state


def test_a_receiver_that_is_down_is_retried_without_delaying_the_next_task(workers, http):
    down = Receiver()
    port = down.server.server_port
    down.close()  # nothing listens on this port now
    workers.start(extra_env=FAST_RETRIES)
    notified = submit(http, {"prompt": "tell a dead receiver", **SMALL, "callback_url": f"http://127.0.0.1:{port}/hook"})
    assert http.poll_until_finished(notified)[0]["status"] == "succeed"
    next_task = submit(http, {"prompt": "next", **SMALL})

    next_final, _ = http.poll_until_finished(next_task, timeout=30)

    assert next_final["status"] == "succeed"
    wait_for(lambda: WebhookDelivery.objects.get().attempts >= 2, timeout=30, what="retries")
    back_up = Receiver(port)
    try:
        wait_for(lambda: back_up.received, timeout=30, what="delivery once the receiver is back")
        wait_for(lambda: WebhookDelivery.objects.get().delivered_at, timeout=10, what="its ack")
        delivery = WebhookDelivery.objects.get()
        assert delivery.delivered_at is not None and delivery.last_status_code == 200 and delivery.attempts >= 3
        assert len(back_up.received) == 1
    finally:
        back_up.close()


def test_a_delivery_queued_by_another_process_wakes_an_idle_worker(workers, http, receiver):
    workers.start(extra_env=FAST_RETRIES)
    done = submit(http, {"prompt": "done", **SMALL, "callback_url": receiver.url})
    assert http.poll_until_finished(done)[0]["status"] == "succeed"
    wait_for(lambda: WebhookDelivery.objects.filter(delivered_at__isnull=False).exists(), timeout=30, what="delivery")

    # The admin's re-send, from this process: only its announcement can reach the idle worker in time.
    assert webhooks.resend(WebhookDelivery.objects.all()) == (1, 0)  # (queued, stale)

    wait_for(lambda: len(receiver.received) == 2, timeout=30, what="the re-sent delivery")
    assert receiver.received[0][1] == receiver.received[1][1]  # the same body, posted again
    wait_for(lambda: WebhookDelivery.objects.get().delivered_at is not None, timeout=10, what="its ack")


def test_a_slow_sender_neither_loses_a_batch_to_another_nor_overwrites_its_delivery(api, settings):
    """A claim holds for a whole batch of timed-out sends; a late failure of a sender whose claim ran
    out does not write over what the sender that took over recorded."""
    from datetime import timedelta

    from django.utils import timezone

    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = True
    task_id = api.post("/v1/tasks/video", {"prompt": "p", "callback_url": "http://127.0.0.1:9/hook"},
                       format="json").json()["task_id"]  # fmt: skip
    delivery = WebhookDelivery.objects.create(task_id=task_id, url="http://127.0.0.1:9/hook", event="task.failed",
                                              payload={"task_id": task_id})  # fmt: skip

    [claimed] = webhooks._claim_due()
    held_s = (claimed.next_attempt_at - timezone.now()).total_seconds()
    assert held_s > webhooks.BATCH * 2 * webhooks.SEND_TIMEOUT_S - 5  # every send of the batch may time out
    assert webhooks._claim_due() == []  # a second sender meanwhile takes nothing
    # The claim ran out and another sender delivered it...
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1), delivered_at=timezone.now(), attempts=1
    )
    # ...then the first sender's send fails (nothing listens on port 9): what it writes is dropped.
    assert webhooks._send(claimed) is False
    delivery.refresh_from_db()
    assert delivery.delivered_at is not None and delivery.attempts == 1 and delivery.last_error == ""


class _Resolver:
    """``socket.getaddrinfo`` with answers for some names (a DNS server the test controls); others resolve."""

    def __init__(self, monkeypatch, answers: dict[str, list[list[str]]]):
        self.answers, self.asked = answers, []
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host not in self.answers:
                return real(host, port, *args, **kwargs)
            self.asked.append(host)
            replies = self.answers[host]
            addresses = replies[min(len(self.asked) - 1, len(replies) - 1)]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _delivery(api, url: str) -> WebhookDelivery:
    task_id = api.post("/v1/tasks/video", {"prompt": "p"}, format="json").json()["task_id"]
    return WebhookDelivery.objects.create(task_id=task_id, url=url, event="task.failed", payload={"task_id": task_id})


def test_a_send_connects_to_the_address_it_checked_not_a_rebound_one(api, settings, monkeypatch, receiver):
    """DNS rebinding: the name is public when checked, then answers loopback; the send never asks again."""
    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = False
    monkeypatch.setattr(webhooks, "SEND_TIMEOUT_S", 1)  # the public address is unreachable from here
    port = receiver.server.server_port
    resolver = _Resolver(monkeypatch, {"hooks.rebind.test": [["1.1.1.1"], ["127.0.0.1"]]})
    delivery = _delivery(api, f"http://hooks.rebind.test:{port}/hook")

    assert webhooks._send(delivery) is False

    assert resolver.asked == ["hooks.rebind.test"] and receiver.received == []
    delivery.refresh_from_db()
    assert "1.1.1.1" in delivery.last_error, delivery.last_error  # refused, or timed out where routed


def test_https_callbacks_are_verified_against_the_url_host_name(api, settings, monkeypatch, tmp_path):
    """The connection goes to the resolved IP, but SNI and the certificate check use the URL's name."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", cert,
         "-subj", "/CN=hooks.example.test", "-addext", "subjectAltName=DNS:hooks.example.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver(tls=tls)
    monkeypatch.setattr(webhooks, "CA_CERTS", str(cert))
    _Resolver(monkeypatch, {"hooks.example.test": [["127.0.0.1"]], "other.example.test": [["127.0.0.1"]]})
    port = receiver.server.server_port
    try:
        signed = _delivery(api, f"https://user:p%40ss@hooks.example.test:{port}/hook?x=1")
        assert webhooks._send(signed) is True
        [(headers, body)] = receiver.received
        assert headers["Host"] == f"hooks.example.test:{port}" and json.loads(body) == signed.payload
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()

        wrong_name = _delivery(api, f"https://other.example.test:{port}/hook")
        assert webhooks._send(wrong_name) is False
        wrong_name.refresh_from_db()
        assert "doesn't match 'hooks.example.test'" in wrong_name.last_error and len(receiver.received) == 1
    finally:
        receiver.close()


def test_an_ipv6_callback_is_delivered(api, settings):
    receiver = Receiver(host="::1")
    port = receiver.server.server_port
    try:
        delivery = _delivery(api, f"http://[::1]:{port}/hook")
        assert webhooks._send(delivery) is True and len(receiver.received) == 1
        assert receiver.received[0][0]["Host"] == f"[::1]:{port}"
    finally:
        receiver.close()


def test_a_receiver_that_trickles_its_answer_cannot_hold_the_sender(api, settings, monkeypatch):
    """A byte every half second resets every read timeout; the exchange as a whole is cut off."""
    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = True
    monkeypatch.setattr(webhooks, "SEND_TIMEOUT_S", 1)
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle():  # for 10 s at most, so a sender without a deadline fails this test instead of hanging
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            with contextlib.suppress(OSError):
                for _ in range(20):
                    connection.sendall(b"H")
                    time.sleep(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    delivery = _delivery(api, f"http://127.0.0.1:{listener.getsockname()[1]}/hook")
    try:
        started = time.monotonic()
        assert webhooks._send(delivery) is False
        assert time.monotonic() - started < 3
    finally:
        listener.close()
