"""Fault injection on real qcluster workers: kills, shutdowns, time limits, unwritable storage, ordering."""
import os
import signal
from datetime import timedelta

import pytest

from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from tasks_app.models import TaskAttempt, VideoTask
from tests.conftest import wait_for
from tests.worker.conftest import SMALL, submit

pytestmark = pytest.mark.worker

# Short leases so a dead worker's task comes back within seconds.
FAST_LEASES = {"LIGHTX2V_LEASE_S": "3", "LIGHTX2V_HEARTBEAT_S": "0.5"}
A_FEW_SECONDS = {"height": 128, "width": 128, "video_duration": 3, "infer_steps": 50}
TEN_SECONDS = {"height": 256, "width": 256, "video_duration": 5, "infer_steps": 50}


@pytest.fixture(autouse=True)
def generous_user_cap(settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 100


def _wait_until_denoising(http, task_id: str) -> dict:
    """The task's status body once it is running and past its first denoising step."""
    return wait_for(
        lambda: (body := http.get(f"/v1/tasks/{task_id}/status").json())["status"] == "running"
        and body["progress"] > 0
        and body,
        timeout=120,
        what=f"task {task_id} to be denoising",
        interval=0.01,
    )


def _outcomes(task_id: str) -> list[str]:
    return list(TaskAttempt.objects.filter(task_id=task_id).order_by("number").values_list("outcome", flat=True))


def test_a_sigkilled_worker_loses_no_task_and_none_runs_twice(workers, http, tmp_path):
    output_root = tmp_path / "outputs"
    # Three busy workers on two cores: a 3 s lease was once lost by a live worker too (its run recorded
    # "lost", run again). 6 s still brings the dead worker's task back within seconds.
    leases = {**FAST_LEASES, "LIGHTX2V_LEASE_S": "6"}
    workers.start(count=3, extra_env={**leases, "LIGHTX2V_OUTPUT_ROOT": str(output_root)})
    victim_task = submit(http, {"prompt": "the one that gets killed", **A_FEW_SECONDS})
    others = [submit(http, {"prompt": f"task {i}", "seed": i, **SMALL}) for i in range(29)]

    running = _wait_until_denoising(http, victim_task)
    victim_pid = int(VideoTask.objects.get(task_id=victim_task).worker_name.rsplit(":", 1)[1])
    os.kill(victim_pid, signal.SIGKILL)

    finals = [http.poll_until_finished(task_id, timeout=300)[0] for task_id in [victim_task, *others]]

    assert running["attempt_count"] == 1
    assert [final["status"] for final in finals] == ["succeed"] * 30
    assert _outcomes(victim_task) == ["lost", "succeed"]
    assert "stopped heartbeating" in TaskAttempt.objects.get(task_id=victim_task, number=1).error
    assert all(_outcomes(task_id) == ["succeed"] for task_id in others)
    assert not VideoTask.objects.filter(status="running").exists()
    outputs = sorted(path.name for path in (output_root / "videos").iterdir())
    expected = [victim_task, *others]
    assert outputs == sorted([f"{task_id}.mp4" for task_id in expected] + [f"{task_id}.jpg" for task_id in expected])


def test_sigterm_during_a_task_finishes_it_or_hands_it_back(workers, http):
    workers.start(extra_env={**FAST_LEASES, "LIGHTX2V_SHUTDOWN_GRACE_S": "1"})
    task_id = submit(http, {"prompt": "interrupted", **TEN_SECONDS})
    _wait_until_denoising(http, task_id)

    assert workers.stop() == []  # every qcluster exited by itself

    after_stop = VideoTask.objects.get(task_id=task_id)
    assert after_stop.status in ("succeed", "submitted")
    if after_stop.status == "submitted":
        assert _outcomes(task_id) == ["handed_back"]
        workers.start(extra_env=FAST_LEASES)
        final, _ = http.poll_until_finished(task_id, timeout=180)
        assert final["status"] == "succeed" and [a["outcome"] for a in final["attempts"]] == ["handed_back", "succeed"]


def test_a_graceful_stop_with_a_task_waiting_behind_the_running_one_exits_and_loses_nothing(workers, http):
    """The waiting task's message was already taken by the cluster's pusher: the sentinel's "STOP"
    waited behind it in the full task queue until the cluster was killed, and it stayed locked in
    the broker for the retry period (over an hour) after the restart."""
    workers.start(extra_env={**FAST_LEASES, "LIGHTX2V_SHUTDOWN_GRACE_S": "1"})
    running = submit(http, {"prompt": "running", **TEN_SECONDS})
    waiting = submit(http, {"prompt": "waiting", **SMALL})
    _wait_until_denoising(http, running)
    wait_for(lambda: not OrmQ.objects.filter(lock__lte=timezone.now()).exists(), timeout=10,
             what="the pusher to take the waiting task's message")  # fmt: skip

    assert workers.stop() == []  # every qcluster exited by itself
    assert not OrmQ.objects.filter(lock__gt=timezone.now()).exists()  # no message held by the stopped cluster
    workers.start(extra_env=FAST_LEASES)
    for task_id in (running, waiting):
        assert http.poll_until_finished(task_id, timeout=120)[0]["status"] == "succeed"


def test_a_task_over_the_time_limit_fails_and_the_next_runs_on_the_same_worker(workers, http):
    workers.start(extra_env={"LIGHTX2V_TASK_TIMEOUT": "2"})
    slow = submit(http, {"prompt": "too slow", **TEN_SECONDS})
    quick = submit(http, {"prompt": "quick", **SMALL})

    slow_final, _ = http.poll_until_finished(slow, timeout=120)
    quick_final, _ = http.poll_until_finished(quick, timeout=120)

    assert slow_final["status"] == "failed" and slow_final["message"] == "failed: timed out after 2 s"
    assert [a["outcome"] for a in slow_final["attempts"]] == ["timed_out"]
    assert quick_final["status"] == "succeed"
    assert quick_final["attempts"][0]["worker_name"] == slow_final["attempts"][0]["worker_name"]


def test_an_output_that_cannot_be_written_fails_the_task_with_the_reason(workers, http, tmp_path):
    output_root = tmp_path / "outputs"
    output_root.mkdir()
    (output_root / "videos").write_text("a file where the videos folder should be")
    workers.start(extra_env={"LIGHTX2V_OUTPUT_ROOT": str(output_root)})
    task_id = submit(http, {"prompt": "nowhere to go", **SMALL})

    final, _ = http.poll_until_finished(task_id)

    # The OS error, naming the path the worker could not write (not one from cleaning up after it).
    assert final["status"] == "failed" and "FileExistsError" in final["message"], final["message"]
    assert str(output_root / "videos") in final["message"]
    assert final["file_path"] == "" and http.get(f"/v1/tasks/{task_id}/result").status_code == 409


# A real connection loss at the worst moment: PostgreSQL ends the session of whoever writes a first run's
# "succeed" (the worker's final write, retried for a lease), as a restart or a network cut would.
_DROP_FIRST_FINISH = """
CREATE FUNCTION test_drop_the_session() RETURNS trigger AS $$
BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER test_drop_first_finish BEFORE UPDATE ON tasks_app_videotask FOR EACH ROW
WHEN (NEW.status = 'succeed' AND NEW.attempt_count = 1) EXECUTE FUNCTION test_drop_the_session();
"""


def test_a_finished_video_whose_final_write_cannot_reach_the_database_is_run_again_not_failed(workers, http):
    with connection.cursor() as cursor:
        cursor.execute(_DROP_FIRST_FINISH)
    try:
        workers.start(extra_env=FAST_LEASES)
        task_id = submit(http, {"prompt": "done, but the database is gone", **SMALL})

        final, _ = http.poll_until_finished(task_id, timeout=120)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER test_drop_first_finish ON tasks_app_videotask; DROP FUNCTION test_drop_the_session")

    assert final["status"] == "succeed", final["message"]
    assert [attempt["outcome"] for attempt in final["attempts"]] == ["lost", "succeed"]
    assert http.get(f"/v1/tasks/{task_id}/result").status_code == 200


def test_tasks_start_in_submission_order_across_workers(workers, http):
    workers.start(count=2)
    task_ids = [submit(http, {"prompt": f"in order {i}", **SMALL}) for i in range(8)]
    for task_id in task_ids:
        assert http.poll_until_finished(task_id)[0]["status"] == "succeed"

    tasks = {task.task_id: task for task in VideoTask.objects.filter(task_id__in=task_ids)}
    started = [tasks[VideoTask._meta.pk.to_python(task_id)].started_at for task_id in task_ids]
    # FIFO claims: a task never starts before one submitted earlier (clock jitter between workers aside).
    for earlier, later in zip(started, started[1:]):
        assert (earlier - later).total_seconds() < 0.05


def test_a_task_whose_queue_message_was_lost_still_runs(workers, http):
    task_id = submit(http, {"prompt": "no message", **SMALL})  # no worker is running yet
    # Gone, as when a claim fails on a database error after its pusher took the message.
    assert OrmQ.objects.all().delete()[0] == 1
    workers.start(extra_env=FAST_LEASES)
    final, _ = http.poll_until_finished(task_id, timeout=60)
    assert final["status"] == "succeed"


def test_a_task_whose_message_a_stopped_cluster_still_holds_runs_on_an_idle_worker(workers, http):
    task_id = submit(http, {"prompt": "message held", **SMALL})  # no worker is running yet
    # Locked for the retry period, as by the pusher of a cluster stopped before handing it on.
    held_until = timezone.now() + timedelta(hours=2)
    assert OrmQ.objects.update(lock=held_until) == 1
    workers.start(extra_env=FAST_LEASES)
    final, _ = http.poll_until_finished(task_id, timeout=60)
    assert final["status"] == "succeed"


def test_a_cluster_whose_connections_were_dropped_runs_the_next_task_at_once(workers, http):
    """As after a database restart or a proxy's idle cut: the pusher and the worker's claim reconnect
    within a second, instead of the pusher's 10 s restart or a lost wake-up message."""
    from django.db import connection

    from tests.conftest import WORKER_APP_NAME

    workers.start()
    warm_up = submit(http, {"prompt": "before the drop", **SMALL})
    assert http.poll_until_finished(warm_up, timeout=60)[0]["status"] == "succeed"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [WORKER_APP_NAME],
        )
        assert cursor.fetchone()[0] >= 3  # at least the pusher's two (queue, LISTEN) and the worker's

    task_id = submit(http, {"prompt": "after the drop", **SMALL})
    final, _ = http.poll_until_finished(task_id, timeout=60)

    assert final["status"] == "succeed" and _outcomes(task_id) == ["succeed"]
    task = VideoTask.objects.get(pk=task_id)
    # The stranded-message sweep would have needed over a heartbeat (5 s), the pusher's restart 10 s.
    assert (task.started_at - task.created_at).total_seconds() < 4, workers.logs()
    assert "retrying the claim or final write" in workers.logs()
