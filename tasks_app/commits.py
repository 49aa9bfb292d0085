"""Which commits wait for PostgreSQL to flush them to disk (``synchronous_commit``).

Durable (the server default): everything the web process writes, a submit above all, and the end
of a run (finish, fail, hand-back), which also queues its webhook. Asynchronous, in the qcluster
processes (``worker_side``): the pusher taking a queue message, a claim, progress, heartbeats,
reaping, webhook records. The first two are on the way from a submit to its start, progress runs
at every step, and each such commit saves a WAL flush (~0.8 ms on this project's machines, more
on a busy disk). The data is visible to other sessions at commit either way; what changes is that
a crash of the database server (not of a worker) can lose the last few hundred milliseconds of
such commits, and every such loss is recovered: a message taken again is harmless (the row is the
truth); a lost claim leaves the task ``submitted``, so that run's heartbeat finds its lease gone
and stops it, its end changes nothing, and a later claim runs the task again; lost progress is
overwritten by the next; a reap is redone; a webhook whose delivery was not recorded is sent once
more (deliveries are at least once anyway: a send that timed out is retried).
"""
from django.db import connection, connections
from django.db.backends.signals import connection_created

RECEIVER_ID = "lightx2v-commit-asynchronously"
_worker_side = False  # whether worker_side() ran in this process


def _commit_asynchronously(sender=None, connection=None, **kwargs) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")


def worker_side() -> None:
    """From now on this process's PostgreSQL connections, those open already included, commit
    asynchronously (except where ``durable`` says otherwise). For qcluster processes only; once per
    process, later calls do nothing."""
    global _worker_side
    if _worker_side:
        return
    _worker_side = True
    connection_created.connect(_commit_asynchronously, dispatch_uid=RECEIVER_ID)
    for open_connection in connections.all(initialized_only=True):
        if open_connection.connection is not None:
            _commit_asynchronously(connection=open_connection)


def durable() -> None:
    """Make the current transaction's commit wait for the flush, whatever the process does otherwise.

    Call inside ``transaction.atomic`` (``SET LOCAL`` lasts until that transaction ends).
    """
    if connection.vendor == "postgresql":
        if not connection.in_atomic_block:
            raise RuntimeError("commits.durable() must be called inside transaction.atomic()")
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO on")
