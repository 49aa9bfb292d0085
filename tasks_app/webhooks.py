"""Webhooks: a signed POST to a task's ``callback_url`` on each terminal state, retried with backoff.

Deliveries are rows (an outbox): ``enqueue`` writes one in the same transaction as the state change
and announces it (``wakeups.WEBHOOK_CHANNEL``), and each worker process's sender thread
(``send_due``) posts due rows, so a slow or dead receiver never holds up generation and a crash
loses nothing. The body is JSON; the headers are

    X-LightX2V-Timestamp: <unix seconds>
    X-LightX2V-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with the owner's secret>

Receivers should reject timestamps older than a few minutes. Callback URLs must be http(s) and, unless
``LIGHTX2V_WEBHOOK_ALLOW_PRIVATE``, resolve only to public addresses (checked at submit and again
before each send, against DNS rebinding).
"""
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from datetime import timedelta
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from . import wakeups
from .models import VideoTask, WebhookDelivery, WebhookSecret

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 5
MAX_BACKOFF_S = 3600
BATCH = 10
CLAIM_HOLD_S = BATCH * SEND_TIMEOUT_S * 3  # a batch of sends, each up to a connect and a read timeout


class CallbackRefused(ValueError):
    """The URL may not be called; the message says why (for a 400 naming ``callback_url``)."""


def check_callback_url(url: str) -> None:
    """Raise ``CallbackRefused`` unless ``url`` is http(s) to a host that resolves to allowed addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("must be an http or https URL")
    try:
        port = parts.port or 443
    except ValueError as exc:  # urlsplit parses lazily: "port out of range", "port could not be cast"
        raise CallbackRefused("port must be a number from 1 to 65535") from exc
    if settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError) as exc:
        raise CallbackRefused("host does not resolve") from exc
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise CallbackRefused("must not point to a loopback, private or reserved address")


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
        check_callback_url(delivery.url)
        response = requests.post(delivery.url, data=body, headers=headers, timeout=SEND_TIMEOUT_S, allow_redirects=False)
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"receiver answered {status_code}"
    except (requests.RequestException, CallbackRefused) as exc:
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


def resend(queryset) -> int:
    """Queue deliveries to be sent again now (operators' admin action)."""
    with transaction.atomic():
        count = queryset.update(delivered_at=None, gave_up_at=None, attempts=0, next_attempt_at=timezone.now())
        wakeups.notify(wakeups.WEBHOOK_CHANNEL)
    return count
