"""The worker's transitions (claim, succeed, fail, hand back) in both forms on PostgreSQL: the one
statement each that ``tasks_app.statements`` runs there, and the ORM form used on other databases.
Both must leave the same rows."""
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.db import connection

from tasks_app import selectors, services, statements
from tasks_app.models import TaskAttempt, VideoTask
from tests.conftest import REPO_ROOT

SUBMIT = "/v1/tasks/video"
FORMS = ["statement", "orm"]


@pytest.fixture(params=FORMS)
def form(request, monkeypatch):
    """Which form the services use; "orm" is what SQLite gets, forced here on PostgreSQL."""
    assert statements.supported()  # the suite runs on PostgreSQL
    if request.param == "orm":
        monkeypatch.setattr(statements, "supported", lambda: False)
    return request.param


def _submit(api, prompt: str, **extra) -> VideoTask:
    response = api.post(SUBMIT, {"prompt": prompt, "height": 64, "width": 64, "seed": 3, **extra}, format="json")
    assert response.status_code == 201, response.content
    return VideoTask.objects.get(pk=response.json()["task_id"])


def _row(task: VideoTask) -> dict:
    """The row's fields, timestamps as "set or not" (they differ between two runs)."""
    row = VideoTask.objects.filter(pk=task.pk).values().get()
    for name in ("created_at", "queued_at", "started_at", "heartbeat_at", "finished_at"):
        row[name] = row[name] is not None
    row.pop("task_id")
    return row


def _attempts(task: VideoTask) -> list[tuple]:
    return list(
        TaskAttempt.objects.filter(task_id=task.pk)
        .order_by("number")
        .values_list("number", "worker_name", "outcome", "error", "finished_at")
    )


def test_claim_takes_the_oldest_submitted_task_and_opens_its_attempt(api, form):
    first, second = _submit(api, "first"), _submit(api, "second")
    VideoTask.objects.filter(pk=second.pk).update(queued_at=first.queued_at - timedelta(seconds=1))
    before = _row(second)

    claimed = services.task_claim_next(worker_name="host:1")

    assert claimed.pk == second.pk
    assert _row(second) == {**before, "status": "running", "worker_name": "host:1", "attempt_count": 1,
                            "message": "loading model", "started_at": True, "heartbeat_at": True}  # fmt: skip
    stored = VideoTask.objects.filter(pk=second.pk).values().get()
    assert {name: getattr(claimed, name) for name in stored} == stored  # the instance is the row, converted
    assert claimed.started_at == claimed.heartbeat_at and claimed.progress == 0.0
    attempt = TaskAttempt.objects.get(task_id=second.pk)
    assert (attempt.number, attempt.worker_name, attempt.outcome, attempt.error, attempt.finished_at) == (
        1, "host:1", "running", "", None)  # fmt: skip
    assert attempt.started_at == claimed.started_at
    assert services.task_claim_next(worker_name="host:2").pk == first.pk
    assert services.task_claim_next(worker_name="host:3") is None


def test_a_second_run_gets_the_next_attempt_number_and_progress_never_goes_back(api, form):
    task = _submit(api, "again")
    run = services.task_claim_next(worker_name="host:1")
    services.task_report_progress(task=run, progress=0.4, message="step 2/4")
    assert services.task_hand_back(task=run, reason="worker shut down")
    assert VideoTask.objects.get(pk=task.pk).progress == 0.4

    rerun = services.task_claim_next(worker_name="host:2")

    assert (rerun.pk, rerun.attempt_count, rerun.worker_name, rerun.progress) == (task.pk, 2, "host:2", 0.4)
    assert [(n, w, o) for n, w, o, _, _ in _attempts(task)] == [(1, "host:1", "handed_back"), (2, "host:2", "running")]
    # The second run starts over; a poller sees progress hold until that run passes the first one.
    services.task_report_progress(task=rerun, progress=0.2, message="step 1/4")
    assert VideoTask.objects.get(pk=task.pk).progress == 0.4
    services.task_report_progress(task=rerun, progress=0.6, message="step 3/4")
    assert VideoTask.objects.get(pk=task.pk).progress == 0.6
    # A lost run (its heartbeat stopped) goes back to the queue keeping its progress too.
    services.task_reap_stale(lease_s=-1, max_attempts=3)
    assert VideoTask.objects.get(pk=task.pk).status == "submitted"
    assert services.task_claim_next(worker_name="host:3").progress == 0.6


def test_each_run_starts_without_earlier_statistics_and_a_stopped_run_writes_its_own_only_where_it_ended(api, form):
    task = _submit(api, "stats")
    run = services.task_claim_next(worker_name="host:1")
    services.task_report_progress(task=run, progress=0.5, message="step 2/4", run_stats={"step_s": 1.0, "steps_done": 2})
    assert services.task_hand_back(task=run, reason="worker shut down")

    rerun = services.task_claim_next(worker_name="host:2")

    assert rerun.run_stats == {} == VideoTask.objects.get(pk=task.pk).run_stats
    assert selectors.eta_seconds(task=rerun) is None  # unknown until it steps, not "0 s" from the first run
    # Reaped and queued again: the lost run's late statistics stay off the queued row.
    services.task_reap_stale(lease_s=-1, max_attempts=3)
    services.task_record_run_stats(task=rerun, run_stats={"from": "the lost run"})
    assert VideoTask.objects.get(pk=task.pk).run_stats == {}
    # Cancelled while running: that run's statistics are kept; a retry starts clean.
    third = services.task_claim_next(worker_name="host:3")
    services.task_cancel(task=VideoTask.objects.get(pk=task.pk))
    services.task_record_run_stats(task=third, run_stats={"steps_done": 1})
    assert VideoTask.objects.get(pk=task.pk).run_stats == {"steps_done": 1}
    services.task_retry(task=VideoTask.objects.get(pk=task.pk))
    assert VideoTask.objects.get(pk=task.pk).run_stats == {}


def test_only_runs_lost_since_submit_or_retry_count_towards_giving_up(api, form):
    task = _submit(api, "through two deploys")
    for worker in ("host:1", "host:2"):  # rolling deploys: both runs handed back
        assert services.task_hand_back(task=services.task_claim_next(worker_name=worker), reason="worker shut down")
    for number in (1, 2):
        services.task_claim_next(worker_name=f"host:lost-{number}")
        services.task_reap_stale(lease_s=-1, max_attempts=3)
        assert VideoTask.objects.get(pk=task.pk).status == "submitted"

    services.task_claim_next(worker_name="host:lost-3")
    [reaped] = services.task_reap_stale(lease_s=-1, max_attempts=3)

    assert (reaped.status, reaped.attempt_count, reaped.lost_runs) == ("failed", 5, 3)
    assert reaped.message.startswith("failed: gave up after 3 lost runs; last: worker host:lost-3 stopped")
    services.task_retry(task=reaped)  # an operator's retry: three more chances, not one
    services.task_claim_next(worker_name="host:after-retry")
    services.task_reap_stale(lease_s=-1, max_attempts=3)
    assert VideoTask.objects.filter(pk=task.pk).values_list("status", "lost_runs").get() == ("submitted", 1)


def test_leases_hold_whatever_the_hosts_clocks_say(api, form, monkeypatch):
    """Heartbeats and the reaper's cutoff are the database's time: a live run keeps its lease when its
    worker's clock is behind and when a reaper's clock is ahead (several machines share one queue)."""
    from django.utils import timezone

    host_clock = timezone.now
    _submit(api, "skewed clocks")
    monkeypatch.setattr(timezone, "now", lambda: host_clock() - timedelta(minutes=2))  # this worker's clock
    run = services.task_claim_next(worker_name="behind:1")
    assert services.task_heartbeat(task=run)

    monkeypatch.setattr(timezone, "now", lambda: host_clock() + timedelta(minutes=2))  # another worker's clock
    assert services.task_reap_stale(lease_s=60, max_attempts=3) == []
    assert VideoTask.objects.get(pk=run.pk).status == "running"
    assert [task.pk for task in services.task_reap_stale(lease_s=-1, max_attempts=3)] == [run.pk]  # still reaps


def test_users_take_turns_and_queue_positions_follow_the_claims(api, make_api, form):
    """Alice queued three before Bob's one: Bob's runs second, not fourth; a user with a task running
    waits behind one without. Every queued task's position is the claim it gets."""
    alice = [_submit(api, f"alice {index}") for index in range(3)]
    bob = _submit(make_api("bob"), "bob's one")
    alice.append(_submit(api, "alice, later"))
    positions = {task.pk: selectors.queue_position(task=task) for task in [*alice, bob]}

    claimed = [services.task_claim_next(worker_name=f"host:{index}").pk for index in range(5)]

    assert claimed == [alice[0].pk, bob.pk, alice[1].pk, alice[2].pk, alice[3].pk]
    assert sorted(positions, key=positions.get) == claimed and sorted(positions.values()) == [1, 2, 3, 4, 5]
    assert services.task_claim_next(worker_name="host:idle") is None


def test_a_claim_retried_after_its_answer_was_lost_gets_the_same_task(api, form):
    """The claim committed but the connection dropped before the worker heard: its retry must not take
    a second task and strand the first until the reaper (which would count a lost run)."""
    first, second = _submit(api, "first"), _submit(api, "second")
    claimed = services.task_claim_next(worker_name="host:1")

    again = services.task_claim_next(worker_name="host:1")

    assert (again.pk, again.attempt_count) == (claimed.pk, 1) == (first.pk, 1)
    assert VideoTask.objects.get(pk=second.pk).status == "submitted"
    assert services.task_finish(task=again, file_path="a.mp4", poster_path="a.jpg", video_info={}, run_stats={})


def test_a_claim_skips_a_row_another_transaction_holds(api, form, transactional_db):
    held, free = _submit(api, "held"), _submit(api, "free")
    settings = connection.settings_dict
    locked, release = threading.Event(), threading.Event()

    def hold_the_row():
        with psycopg.connect(host=settings["HOST"], port=settings["PORT"], user=settings["USER"],
                             dbname=settings["NAME"]) as other:  # fmt: skip
            other.execute("SELECT 1 FROM tasks_app_videotask WHERE task_id = %s FOR UPDATE", [held.pk])
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(10)
        claimed = services.task_claim_next(worker_name="host:1")
    finally:
        release.set()
        holder.join()
    assert claimed.pk == free.pk
    assert VideoTask.objects.get(pk=held.pk).status == "submitted"


def test_succeed_fail_and_hand_back_end_the_run_and_its_attempt(api, form):
    tasks = [_submit(api, name) for name in ("ok", "bad", "back")]
    runs = {}
    for number, _ in enumerate(tasks):  # three worker processes: one claims again only once its run ended
        run = services.task_claim_next(worker_name=f"host:{number}")
        runs[run.prompt] = run
    video_info = {"frames": 17, "fps": 16.0, "width": 64, "height": 64}

    assert services.task_finish(task=runs["ok"], file_path="a.mp4", poster_path="a.jpg", video_info=video_info,
                                run_stats={"encode_s": 0.01})  # fmt: skip
    assert services.task_fail(task=runs["bad"], error="ValueError: no\ntrace", run_stats={"attempt": 1})
    assert services.task_hand_back(task=runs["back"], reason="worker shut down")

    ok, bad, back = (VideoTask.objects.get(pk=runs[name].pk) for name in ("ok", "bad", "back"))
    assert (ok.status, ok.progress, ok.message, ok.file_path, ok.poster_path) == (
        "succeed", 1.0, "completed", "a.mp4", "a.jpg")  # fmt: skip
    assert (ok.video_info, ok.run_stats) == (video_info, {"encode_s": 0.01}) and ok.finished_at is not None
    assert (bad.status, bad.message, bad.error, bad.run_stats) == (
        "failed", "failed: ValueError: no", "ValueError: no\ntrace", {"attempt": 1})  # fmt: skip
    assert (back.status, back.progress, back.message, back.heartbeat_at, back.finished_at) == (
        "submitted", 0.0, "queued again: worker shut down", None, None)  # fmt: skip
    outcomes = {name: _attempts(runs[name]) for name in runs}
    assert [row[2:4] for row in outcomes["ok"]] == [("succeed", "")]
    assert [row[2:4] for row in outcomes["bad"]] == [("failed", "ValueError: no")]  # no traceback for the owner
    assert [row[2:4] for row in outcomes["back"]] == [("handed_back", "worker shut down")]
    assert all(row[4] is not None for rows in outcomes.values() for row in rows)
    if form == "statement":  # one statement: the attempt ends at the row's own finished_at
        assert outcomes["ok"][0][4] == ok.finished_at


def test_a_run_that_lost_its_task_changes_nothing(api, form):
    cancelled, reclaimed = _submit(api, "cancelled"), _submit(api, "reclaimed")
    runs = {}
    for _ in range(2):
        run = services.task_claim_next(worker_name="host:1")
        runs[run.prompt] = run
    services.task_cancel(task=VideoTask.objects.get(pk=cancelled.pk))
    VideoTask.objects.filter(pk=reclaimed.pk).update(worker_name="host:2", attempt_count=2)  # another run's lease
    before = {task.pk: (_row(task), _attempts(task)) for task in (cancelled, reclaimed)}

    for run in runs.values():
        assert not services.task_finish(task=run, file_path="x.mp4", poster_path="x.jpg", video_info={},
                                        run_stats={})  # fmt: skip
        assert not services.task_fail(task=run, error="late")
        assert not services.task_hand_back(task=run, reason="late")

    assert {task.pk: (_row(task), _attempts(task)) for task in (cancelled, reclaimed)} == before


@pytest.mark.parametrize("prepare", [True, False])
def test_statements_are_prepared_only_when_the_setting_allows(api, monkeypatch, prepare, transactional_db):
    """``LIGHTX2V_DB_PREPARE=0`` (a pooler that cannot keep prepared statements) leaves none on the server."""
    # What lightx2v_site.settings makes of LIGHTX2V_DB_PREPARE: the connection's prepare threshold.
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "prepare_threshold", 5 if prepare else None)
    task = _submit(api, "pooled")
    connection.close()  # a fresh session with that option, nothing prepared on it yet
    run = services.task_claim_next(worker_name="host:1")
    assert services.task_finish(task=run, file_path="a.mp4", poster_path="a.jpg", video_info={}, run_stats={})
    assert api.get(f"/v1/tasks/{task.pk}/status").json()["status"] == "succeed"
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert any("SKIP LOCKED" in statement for statement in prepared) is prepare
    assert any("WITH finished AS" in statement for statement in prepared) is prepare


@pytest.mark.parametrize("value, threshold", [("1", 5), ("0", None)])
def test_the_setting_becomes_the_connections_prepare_threshold(value, threshold):
    env = {**os.environ, "LIGHTX2V_DB_PREPARE": value, "DEBUG": "1",
           "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/unused", "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings"}  # fmt: skip
    code = "from django.conf import settings; print(settings.DATABASES['default']['OPTIONS']['prepare_threshold'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == str(threshold), result.stderr


def test_a_run_stuck_past_its_time_limit_loses_its_lease_with_its_process(api, settings, monkeypatch):
    """The heartbeat thread renews a lease whatever the main thread does; a main thread stuck in a hung
    kernel never reaches a step check, so a lease past the limit the heartbeat ends the process."""
    from tasks_app import worker_process

    class Exited(Exception):
        pass

    def exit_now():
        raise Exited

    monkeypatch.setattr(worker_process, "_exit_now", exit_now)
    _submit(api, "hangs")
    run = worker_process.begin(services.task_claim_next(worker_name="host:1"))
    try:
        run.deadline = time.monotonic() + 1  # within its limit: the lease is renewed
        worker_process._beat()
        renewed_at = VideoTask.objects.get(pk=run.task.pk).heartbeat_at
        assert renewed_at > run.task.heartbeat_at

        run.deadline = time.monotonic() - settings.LIGHTX2V_LEASE_S - 1
        with pytest.raises(Exited):
            worker_process._beat()
        assert VideoTask.objects.get(pk=run.task.pk).heartbeat_at == renewed_at  # not renewed: the reaper takes it
    finally:
        worker_process.end()
