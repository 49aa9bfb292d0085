"""Wake-ups over PostgreSQL LISTEN/NOTIFY, so workers act at once instead of at their next poll.

* ``QUEUE_CHANNEL``: a django-q2 message was queued (a task submitted, retried, handed back or
  reaped). ``NotifyingORM`` sends it and, in each qcluster's pusher, waits for it rather than
  sleeping through a poll interval: a submit reaches an idle worker in milliseconds.
* ``CANCEL_CHANNEL``, payload the task id: a running task was cancelled. Each worker process's
  listener thread (``worker_process``) stops its run at the next denoising step, whatever the
  progress-write interval.
* ``WEBHOOK_CHANNEL``: a webhook delivery was queued (a task finished or was cancelled, or an operator
  re-sent one). The same listener thread wakes its process's webhook sender, which otherwise only
  looks when a retry falls due or every ``LIGHTX2V_WEBHOOK_POLL_S``.

Notifications are sent in the transaction of the change, so PostgreSQL delivers them only once the
change is visible, and never for a change that rolled back. On other databases nothing is sent
and the polls (django-q2's ``poll``, the progress writes, the heartbeat) remain the only path;
they stay in place on PostgreSQL too, as the backstop for a notification a listener missed.
"""
from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta

from django.db import DatabaseError, connection, connections
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import OrmQ
from django_q.tasks import async_task

from . import commits
from .models import VideoTask

logger = logging.getLogger(__name__)

QUEUE_CHANNEL = "lightx2v_queue"
CANCEL_CHANNEL = "lightx2v_cancel"
WEBHOOK_CHANNEL = "lightx2v_webhook"
# Longest wait for a queue notification before looking at the queue anyway.
QUEUE_WAIT_S = 1.0
# After a listener connection failed, how long to poll before trying to listen again.
RELISTEN_AFTER_S = 5.0
# After a failed read of the queue, the pause before the next one (on a fresh connection).
QUEUE_RETRY_S = 0.5


_ENQUEUE = (
    f'WITH queued AS (INSERT INTO "{OrmQ._meta.db_table}" ("key", "payload", "lock") VALUES (%s, %s, %s)'
    ' RETURNING "id") SELECT "id", pg_notify(%s, \'\') FROM queued'
)
_TAKE_QUEUED = (
    f'UPDATE "{OrmQ._meta.db_table}" SET "lock" = %s WHERE "id" IN ('
    f'SELECT "id" FROM "{OrmQ._meta.db_table}" WHERE "key" = %s AND "lock" < %s'
    ' ORDER BY "id" LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING "id", "payload"'
)


def supported() -> bool:
    return connection.vendor == "postgresql"


WORKER_ENTRY = "tasks_app.worker.run_next_task"


def wake_workers() -> None:
    """Queue a "there is work" message; the row, not the message, says which task runs."""
    async_task(WORKER_ENTRY, task_name="video-task")


def wake_stranded(*, waiting_s: float) -> bool:
    """Queue a wake-up when a submitted task has waited over ``waiting_s`` and the broker holds no
    message a worker could take now; True if it did. Called by idle workers.

    A task strands when a claim failed (a database error) after its message was taken, or when a
    cluster stopped holding a taken message (locked for Q_CLUSTER's retry, over an hour). A taken
    message does not count: an idle worker should not wait for it, and the one extra wake-up of a
    message that was on its way after all only runs a claim that finds nothing.
    """
    if OrmQ.objects.filter(key=get_broker().list_key, lock__lte=timezone.now()).exists():
        return False
    cutoff = timezone.now() - timedelta(seconds=waiting_s)
    if not VideoTask.objects.filter(status=VideoTask.Status.SUBMITTED, queued_at__lt=cutoff).exists():
        return False
    logger.warning("a task has waited over %g s with no queued message; waking the workers", waiting_s)
    wake_workers()
    return True


def notify(channel: str, payload: str = "") -> None:
    """Send ``payload`` on ``channel`` with the current transaction (at once in autocommit)."""
    if supported():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


class Listener:
    """Its own autocommit connection to the default database, LISTENing on ``channels``."""

    def __init__(self, *channels: str):
        import psycopg  # the PostgreSQL driver; only imported where it is the backend

        params = connections["default"].get_connection_params()
        for django_only in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(django_only, None)
        self._connection = psycopg.connect(**params, autocommit=True)
        for channel in channels:
            self._connection.execute(f'LISTEN "{channel}"')

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """``(channel, payload)`` of what arrived, waiting up to ``timeout`` s for the first one."""
        received = [(n.channel, n.payload) for n in self._connection.notifies(timeout=timeout, stop_after=1)]
        if received:  # take whatever else is already there, without waiting
            received += [(n.channel, n.payload) for n in self._connection.notifies(timeout=0.0)]
        return received

    def close(self) -> None:
        """Close the connection; never raises (a listener is closed when it is being given up)."""
        with contextlib.suppress(Exception):
            self._connection.close()


class NotifyingORM(ORM):
    """django-q2's ORM broker that sends ``QUEUE_CHANNEL`` on enqueue and, with an empty queue,
    waits for it (up to ``QUEUE_WAIT_S``) instead of sleeping through the poll interval.

    Set as ``Q_CLUSTER["broker_class"]``. On other databases, or while the listener connection is
    down, it is the plain ORM broker.
    """

    _listener: Listener | None = None
    _listen_again_at = 0.0

    def enqueue(self, task):
        """Queue the signed package ``task`` and announce it; on PostgreSQL one statement (the ORM
        broker's model insert plus a NOTIFY were ~1.6 ms more per submit on a slow 2-core machine)."""
        if not supported():
            return super().enqueue(task)
        with self._orm_cursor() as cursor:
            cursor.execute(_ENQUEUE, [self.list_key or Conf.CLUSTER_NAME, task, timezone.now(), QUEUE_CHANNEL])
            return cursor.fetchone()[0]

    def dequeue(self):
        """The next queued messages, or None. A database error is logged and gives None after
        ``QUEUE_RETRY_S``, its connection closed: django-q2's pusher answers an exception by sleeping
        10 s and exiting for its sentinel to start another, which a connection the database or a
        proxy dropped would otherwise cost every cluster once."""
        try:
            return self._dequeue()
        except DatabaseError as exc:
            logger.warning("reading the queue failed (%s); again in %s s on a new connection", exc, QUEUE_RETRY_S)
            connections[Conf.ORM].close()
            time.sleep(QUEUE_RETRY_S)
            return None

    def _dequeue(self):
        listener = self._queue_listener()
        if listener is None:
            return super().dequeue()  # polling: reads, then sleeps its poll interval when empty
        commits.worker_side()  # only a pusher dequeues: its lock updates need not wait for a flush
        listening = self._wait(listener, 0.0)  # what was announced so far is in the queue already
        taken = self._take_queued()
        if not taken and listening:
            self._wait(listener, QUEUE_WAIT_S)
            taken = self._take_queued()
        # Nothing yet: the pusher asks again at once. The ORM broker would first sleep its poll
        # interval, and a notification arriving then would wait for it.
        return taken or None

    def _wait(self, listener: Listener, timeout: float) -> bool:
        """Wait for ``QUEUE_CHANNEL`` up to ``timeout`` s; False if the listener broke (and was dropped)."""
        try:
            listener.wait(timeout=timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - a broken listener only means polling for a while
            logger.warning("queue listener failed (%s); polling for %s s", exc, RELISTEN_AFTER_S)
            self._drop_listener()
            return False

    def _take_queued(self) -> list[tuple[int, str]]:
        """``(id, payload)`` of up to ``Conf.BULK`` queued messages, oldest first, each locked for
        ``Conf.RETRY`` s: what the ORM broker's dequeue takes, in one statement instead of a read and
        an update per message (another cluster's pusher skips what this one holds)."""
        now = timezone.now()
        with self._orm_cursor() as cursor:
            cursor.execute(_TAKE_QUEUED, [now + timedelta(seconds=Conf.RETRY), self.list_key, now, Conf.BULK])
            return cursor.fetchall()

    def _orm_cursor(self):
        """A cursor on the broker's database, after the ORM broker's own connection upkeep
        (``get_connection`` closes a stale connection when not inside a transaction)."""
        self.get_connection()
        return connections[Conf.ORM].cursor()

    def _queue_listener(self) -> Listener | None:
        if self._listener is None and supported() and time.monotonic() >= self._listen_again_at:
            try:
                self._listener = Listener(QUEUE_CHANNEL)
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                logger.warning("cannot listen for queued tasks (%s); polling for %s s", exc, RELISTEN_AFTER_S)
                self._drop_listener()
        return self._listener

    def _drop_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._listen_again_at = time.monotonic() + RELISTEN_AFTER_S
