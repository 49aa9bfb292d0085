"""What the worker side writes without waiting for a WAL flush, what it still makes durable, and how
its pusher takes queue messages (``tasks_app.commits``, ``tasks_app.wakeups.NotifyingORM``)."""
import threading
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.db.backends.signals import connection_created
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.models import OrmQ

from tasks_app import commits, services, statements, wakeups
from tasks_app.models import VideoTask


def _synchronous_commit(db_connection=connection) -> str:
    with db_connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.fixture
def worker_side(monkeypatch, transactional_db):
    """This (test) process acting as a qcluster process; undone afterwards."""
    monkeypatch.setattr(commits, "_worker_side", False)
    commits.worker_side()
    yield
    connection_created.disconnect(dispatch_uid=commits.RECEIVER_ID)
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO on")


def test_worker_side_connections_commit_without_waiting_for_the_flush(worker_side):
    assert _synchronous_commit() == "off"  # the connection that was already open
    seen_in_thread = []

    def other_thread():  # its own connection, opened after worker_side()
        seen_in_thread.append(_synchronous_commit())
        connections.close_all()

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen_in_thread == ["off"]
    commits.worker_side()  # a second call changes nothing
    assert _synchronous_commit() == "off"


def test_the_end_of_a_run_is_durable_in_a_worker(api, worker_side, monkeypatch):
    response = api.post("/v1/tasks/video", {"prompt": "durable", "height": 64, "width": 64}, format="json")
    assert response.status_code == 201, response.content
    claimed = services.task_claim_next(worker_name="host:1")
    assert claimed is not None and str(claimed.pk) == response.json()["task_id"]
    in_force_at_finish = []
    real_finish_run = statements.finish_run

    def finish_run_recording_the_setting(**kwargs):
        in_force_at_finish.append(_synchronous_commit())  # same transaction as the finish statement
        return real_finish_run(**kwargs)

    monkeypatch.setattr(statements, "finish_run", finish_run_recording_the_setting)
    assert services.task_finish(task=claimed, file_path="v.mp4", poster_path="p.jpg", video_info={}, run_stats={})
    assert in_force_at_finish == ["on"]
    assert _synchronous_commit() == "off"  # SET LOCAL ended with the finish's transaction
    assert VideoTask.objects.get(pk=claimed.pk).status == VideoTask.Status.SUCCEED


def test_durable_needs_a_transaction(transactional_db):
    with pytest.raises(RuntimeError, match="inside transaction.atomic"):
        commits.durable()


def _broker() -> wakeups.NotifyingORM:
    broker = get_broker()
    assert isinstance(broker, wakeups.NotifyingORM)
    return broker


def test_the_pusher_takes_queued_messages_oldest_first_and_locks_them(transactional_db):
    assert Conf.BULK == 1  # settings: one message at a time, no prefetch
    broker = _broker()
    first, second = broker.enqueue("first"), broker.enqueue("second")
    before = timezone.now()

    assert broker._take_queued() == [(first, "first")]
    assert OrmQ.objects.get(pk=first).lock >= before + timedelta(seconds=Conf.RETRY - 1)  # held for the retry period
    assert broker._take_queued() == [(second, "second")]
    assert broker._take_queued() == []
    OrmQ.objects.filter(pk=first).update(lock=timezone.now() - timedelta(seconds=1))  # its retry period ran out
    assert broker._take_queued() == [(first, "first")]


def test_dequeue_returns_what_was_announced_and_none_after_an_empty_wait(transactional_db, monkeypatch):
    monkeypatch.setattr(wakeups, "QUEUE_WAIT_S", 0.05)
    monkeypatch.setattr(commits, "_worker_side", True)  # keep this test process's commits as they are
    broker = _broker()
    try:
        assert broker.dequeue() is None  # listens from now on; the queue is empty
        message = broker.enqueue("announced")  # its NOTIFY wakes the next wait
        assert broker.dequeue() == [(message, "announced")]
        assert broker.dequeue() is None
        wakeups.notify(wakeups.QUEUE_CHANNEL)  # an announcement with nothing queued (already taken)
        assert broker.dequeue() is None
    finally:
        broker._drop_listener()
