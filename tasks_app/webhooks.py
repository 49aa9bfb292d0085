"""Webhooks: a signed POST to a task's ``callback_url`` on each terminal state, retried with backoff.

Deliveries are rows (an outbox): ``enqueue`` writes one in the same transaction as the state change
and announces it (``wakeups.WEBHOOK_CHANNEL``), and each worker process's sender thread
(``send_due``) posts due rows, so a slow or dead receiver never holds up generation and a crash
loses nothing. The body is JSON; the headers are

    X-LightX2V-Timestamp: <unix seconds>
    X-LightX2V-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with the owner's secret>

Receivers should reject timestamps older than a few minutes. Callback URLs must be http(s) and, unless
``LIGHTX2V_WEBHOOK_ALLOW_PRIVATE``, resolve only to public addresses (checked at submit and again
before each send, which then connects to the addresses it checked: no DNS rebinding).
"""
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import timedelta
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import certifi
import urllib3
import urllib3.connection
from urllib3.util.ssl_match_hostname import CertificateError
from django.conf import settings
from django.db import transaction
from django.db.models import F, Min, OuterRef, Subquery, Value
from django.db.models.functions import Concat
from django.utils import timezone

from . import wakeups
from .models import VideoTask, WebhookDelivery, WebhookSecret

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 5
MAX_BACKOFF_S = 3600
BATCH = 10
USER_AGENT = "lightx2v-webhooks/1"
CA_CERTS = certifi.where()
CLAIM_HOLD_S = BATCH * SEND_TIMEOUT_S * 3  # a batch of sends, each up to a connect and an exchange timeout


class CallbackRefused(ValueError):
    """The URL may not be called; the message says why (for a 400 naming ``callback_url``)."""


# What a send can end in short of an answer: a refused URL, no connection, TLS, a broken or cut-off exchange.
SEND_FAILURES = (CallbackRefused, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, CertificateError)


def check_callback_url(url: str) -> None:
    """Raise ``CallbackRefused`` unless ``url`` is http(s) to a host that resolves to allowed addresses.

    With ``LIGHTX2V_WEBHOOK_ALLOW_PRIVATE`` only the URL's form is checked (the host may resolve later).
    """
    parts, host, port = _parse(url)
    if not settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE:
        _allowed_addresses(host, port)


def _parse(url: str) -> tuple[SplitResult, str, int]:
    """The URL's parts, its host name in ASCII (IDNA) and its port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("must be an http or https URL")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise CallbackRefused("host is not a valid name") from exc
    try:
        return parts, host, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # urlsplit parses lazily: "port out of range", "port could not be cast"
        raise CallbackRefused("port must be a number from 1 to 65535") from exc


def _allowed_addresses(hostname: str, port: int) -> list[str]:
    """The host's addresses in the resolver's order; ``CallbackRefused`` if any is not public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CallbackRefused("host does not resolve") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address.split("%")[0])):
                raise CallbackRefused("must not point to a loopback, private or reserved address")
    return addresses


# IPv6 prefixes that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052, 8215) and the
# deprecated IPv4-compatible form. Python's is_global judges the IPv6 address, not the one it reaches.
_IPV4_CARRYING = [ipaddress.ip_network(prefix) for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96")]


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, and for an IPv6 one that embeds an IPv4 address (mapped, 6to4, NAT64,
    IPv4-compatible) that IPv4 address too; site-local (fec0::/10) is not public."""
    if not ip.is_global or ip.is_multicast:
        return False
    if ip.version == 4:
        return True
    if ip.is_site_local:
        return False
    embedded = ip.ipv4_mapped or ip.sixtofour
    if embedded is None and any(ip in network for network in _IPV4_CARRYING):
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return embedded is None or _is_public(embedded)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body`` to ``url`` and return the receiver's status code (redirects are not followed).

    The host is resolved and checked once, and the connection goes to those very addresses (in order,
    within one connect timeout), so a DNS answer that changes after the check (rebinding to an
    internal address) is never used. HTTPS verifies the certificate against the URL's host name.
    Connecting and the exchange take at most SEND_TIMEOUT_S each.
    """
    parts, host, port = _parse(url)
    addresses = _allowed_addresses(host, port)
    host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    headers = {**headers, "Host": host_header, "User-Agent": USER_AGENT}
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = urllib3.util.make_headers(basic_auth=credentials)["authorization"]
    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connect_by = time.monotonic() + SEND_TIMEOUT_S
    for index, address in enumerate(addresses):
        timeout = max(connect_by - time.monotonic(), 0.1)
        if parts.scheme == "https":
            connection = urllib3.connection.HTTPSConnection(
                address, port, timeout=timeout, cert_reqs="CERT_REQUIRED", ca_certs=CA_CERTS,
                server_hostname=host, assert_hostname=host,
            )  # fmt: skip
        else:
            connection = urllib3.connection.HTTPConnection(address, port, timeout=timeout)
        try:
            connection.connect()
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError):
            connection.close()
            if index == len(addresses) - 1 or time.monotonic() >= connect_by:
                raise
            continue
        return _exchange(connection, target, body, headers)
    raise AssertionError("getaddrinfo returns at least one address")  # pragma: no cover


def _exchange(connection, target: str, body: bytes, headers: dict[str, str]) -> int:
    """Send the request on ``connection`` and return the answer's status, all within SEND_TIMEOUT_S:
    a receiver trickling its answer a byte at a time would reset every read timeout, so the socket
    is shut under it when the time is up. The answer's body is never read."""
    connection.sock.settimeout(SEND_TIMEOUT_S)
    cut_off = threading.Timer(SEND_TIMEOUT_S, connection.sock.shutdown, args=(socket.SHUT_RDWR,))
    cut_off.start()
    try:
        connection.request("POST", target, body=body, headers=headers, preload_content=False)
        return connection.getresponse().status
    finally:
        cut_off.cancel()
        connection.close()


def enqueue(task: VideoTask) -> None:
    """Record a delivery of ``task``'s current (terminal) state, if it has a callback URL."""
    if not task.callback_url:
        return
    WebhookDelivery.objects.create(
        task=task, url=task.callback_url, event=f"task.{task.status}", payload=_payload(task)
    )
    wakeups.notify(wakeups.WEBHOOK_CHANNEL)


def supersede(task: VideoTask) -> int:
    """Stop sending ``task``'s undelivered notifications (it was queued again: they report a state it
    left, and would reach the receiver after the new one); returns how many. Same transaction as the retry."""
    return _pending().filter(task=task).update(gave_up_at=timezone.now(), last_error="superseded: the task was retried")


def _payload(task: VideoTask) -> dict:
    return {
        "event": f"task.{task.status}",
        "task_id": str(task.task_id),
        "status": task.status,
        "message": task.message,
        "file_path": task.file_path,
        "poster_path": task.poster_path,
        "video_info": task.video_info,
        "created_at": task.created_at.isoformat() if task.created_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }


def signature_headers(*, secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-LightX2V-Timestamp": str(timestamp),
        "X-LightX2V-Signature": f"sha256={mac}",
    }


def secret_for(user) -> str:
    return WebhookSecret.objects.get_or_create(user=user)[0].secret


def _pending():
    """Deliveries neither delivered nor given up (what ``webhook_due_idx`` indexes)."""
    return WebhookDelivery.objects.filter(delivered_at__isnull=True, gave_up_at__isnull=True)


def _claim_due() -> list[WebhookDelivery]:
    """Due deliveries, each pushed ``CLAIM_HOLD_S`` into the future so other senders skip it while
    this one sends the batch (each send may take a connect and a read timeout, one after another)."""
    now = timezone.now()
    claimed_until = now + timedelta(seconds=CLAIM_HOLD_S)
    with transaction.atomic():
        due = list(
            _pending()
            .select_for_update(skip_locked=True)
            .select_related("task__owner")
            .filter(next_attempt_at__lte=now)
            .order_by("next_attempt_at")[:BATCH]
        )
        WebhookDelivery.objects.filter(pk__in=[d.pk for d in due]).update(next_attempt_at=claimed_until)
    for delivery in due:
        delivery.next_attempt_at = claimed_until  # the claim: _send writes back only while it holds
    return due


def seconds_until_due() -> float | None:
    """How long until the earliest pending delivery is due (0.0 if one is due now); None if none is pending."""
    earliest = _pending().aggregate(at=Min("next_attempt_at"))["at"]
    return None if earliest is None else max((earliest - timezone.now()).total_seconds(), 0.0)


def send_due() -> int:
    """Send every due delivery once; returns how many were delivered."""
    delivered = 0
    for delivery in _claim_due():
        delivered += _send(delivery)
    return delivered


def _send(delivery: WebhookDelivery) -> bool:
    body = json.dumps(delivery.payload, sort_keys=True).encode()
    headers = signature_headers(secret=secret_for(delivery.task.owner), body=body, timestamp=int(time.time()))
    status_code, error = None, ""
    try:
        status_code = _post(delivery.url, body, headers)
        if not 200 <= status_code < 300:
            error = f"receiver answered {status_code}"
    except SEND_FAILURES as exc:
        error = f"{type(exc).__name__}: {exc}"
    claimed_until = delivery.next_attempt_at
    delivery.attempts += 1
    delivery.last_status_code, delivery.last_error = status_code, error[:2000]
    now = timezone.now()
    if not error:
        delivery.delivered_at = now
    elif delivery.attempts >= settings.LIGHTX2V_WEBHOOK_MAX_ATTEMPTS:
        delivery.gave_up_at = now
        logger.warning("webhook %s gave up after %d attempts: %s", delivery.pk, delivery.attempts, error)
    else:
        backoff = min(settings.LIGHTX2V_WEBHOOK_BACKOFF_S * 2 ** (delivery.attempts - 1), MAX_BACKOFF_S)
        delivery.next_attempt_at = now + timedelta(seconds=backoff)
    # Only while this sender's claim holds: a sender that took the delivery over after the claim ran
    # out (or an operator's resend) keeps what it wrote, e.g. "delivered".
    fields = ["attempts", "last_status_code", "last_error", "delivered_at", "gave_up_at", "next_attempt_at"]
    _pending().filter(pk=delivery.pk, next_attempt_at=claimed_until).update(
        **{name: getattr(delivery, name) for name in fields}
    )
    return not error


def resend(queryset) -> tuple[int, int]:
    """Queue those of the deliveries in ``queryset`` that report their task's current state to be sent
    again now (operators' admin action); returns (queued, stale). Stale: not the task's newest
    delivery, or of a status the task has left (retried since): it would tell the receiver a state
    the task is no longer in, after the one it is in."""
    newest = WebhookDelivery.objects.filter(task=OuterRef("task")).order_by("-created_at", "-pk").values("pk")[:1]
    current = queryset.filter(pk=Subquery(newest), event=Concat(Value("task."), F("task__status")))
    with transaction.atomic():
        queued = current.update(
            delivered_at=None, gave_up_at=None, attempts=0, last_error="", next_attempt_at=timezone.now()
        )
        wakeups.notify(wakeups.WEBHOOK_CHANNEL)
    return queued, queryset.count() - queued
