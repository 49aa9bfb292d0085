"""The poll path's lean reads and rendering give exactly what the ORM and DRF's field-by-field rendering give."""
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework import serializers as drf_serializers
from rest_framework.test import APIRequestFactory

from tasks_app import selectors
from tasks_app.models import ApiToken, TaskAttempt, VideoTask
from tasks_app.serializers import TaskStatusSerializer

SMALL = {"height": 64, "width": 64}


def _drf_rendering(task: VideoTask, request) -> dict:
    """What DRF's ModelSerializer renders for ``task``, field by field (the reference)."""
    serializer = TaskStatusSerializer(context={"request": request})
    return drf_serializers.ModelSerializer.to_representation(serializer, task)


def _tasks_in_every_state(api) -> list[str]:
    ids = [api.post("/v1/tasks/video", {"prompt": f"p{i}", **SMALL}, format="json").json()["task_id"] for i in range(6)]
    now = timezone.now()
    submitted, running, succeeded, failed, cancelled, lost_then_done = ids
    VideoTask.objects.filter(task_id=running).update(
        status="running", started_at=now, attempt_count=1, worker_name="w:1",
        run_stats={"step_s": 0.25, "steps_done": 1}, progress=0.2, message="step 1/4",
    )  # fmt: skip
    TaskAttempt.objects.create(task_id=running, number=1, worker_name="w:1", started_at=now)
    VideoTask.objects.filter(task_id=succeeded).update(
        status="succeed", started_at=now, finished_at=now + timedelta(seconds=3), progress=1.0,
        file_path=f"outputs/videos/{succeeded}.mp4", poster_path=f"outputs/videos/{succeeded}.jpg",
        video_info={"frames": 17, "fps": 16.0}, run_stats={"step_s": 0.5, "options": {"attention": "sdpa"}},
    )  # fmt: skip
    VideoTask.objects.filter(task_id=failed).update(status="failed", message="failed: boom", finished_at=now)
    VideoTask.objects.filter(task_id=cancelled).update(status="cancelled", finished_at=now)
    VideoTask.objects.filter(task_id=lost_then_done).update(status="succeed", attempt_count=2, finished_at=now)
    TaskAttempt.objects.create(task_id=lost_then_done, number=2, worker_name="w:2", started_at=now, outcome="succeed")
    TaskAttempt.objects.create(
        task_id=lost_then_done, number=1, worker_name="w:1", started_at=now - timedelta(minutes=2),
        finished_at=now - timedelta(minutes=1), outcome="lost", error="no heartbeat",
    )  # fmt: skip
    # A history of one finished task, so the queued task has an ETA.
    VideoTask.objects.filter(task_id=succeeded).update(started_at=now - timedelta(seconds=3), finished_at=now)
    assert VideoTask.objects.get(task_id=submitted).status == "submitted"
    return ids


@pytest.mark.django_db
def test_poll_bodies_equal_drf_rendering_of_the_orm_task_in_every_state(api):
    request = APIRequestFactory().get("/", HTTP_HOST="testserver")
    for task_id in _tasks_in_every_state(api):
        polled = api.get(f"/v1/tasks/{task_id}/status").json()
        reference = _drf_rendering(VideoTask.objects.get(task_id=task_id), request)
        assert polled == reference, task_id
        assert list(polled) == list(reference)  # same field order
    statuses = {api.get(f"/v1/tasks/{i}/status").json()["status"] for i in _tasks_in_every_state(api)}
    assert statuses == {"submitted", "running", "succeed", "failed", "cancelled"}


@pytest.mark.django_db
def test_owned_task_reads_what_the_orm_reads_and_only_for_its_owner(api, make_api):
    ids = _tasks_in_every_state(api)
    for task_id in ids:
        lean = selectors.owned_task(owner=api.user, task_id=task_id)
        orm = VideoTask.objects.get(task_id=task_id)
        for field in VideoTask._meta.concrete_fields:
            assert getattr(lean, field.attname) == getattr(orm, field.attname), field.name
        expected = list(orm.attempt_records.order_by("number").values_list("number", "outcome", "finished_at"))
        assert [(a.number, a.outcome, a.finished_at) for a in lean.loaded_attempts] == expected
    assert selectors.owned_task(owner=make_api("bob").user, task_id=ids[0]) is None


@pytest.mark.django_db
def test_a_poll_is_two_reads_and_writes_last_used_at_at_most_once_a_minute(api):
    task_id = api.post("/v1/tasks/video", {"prompt": "p", **SMALL}, format="json").json()["task_id"]
    VideoTask.objects.filter(task_id=task_id).update(status="succeed")
    token = ApiToken.objects.get(user=api.user)
    first_use = token.last_used_at
    assert first_use is not None  # the submit used it

    with CaptureQueriesContext(connection) as queries:
        assert api.get(f"/v1/tasks/{task_id}/status").status_code == 200
    assert len(queries) == 2, [q["sql"][:80] for q in queries]  # the token with its user, the task with its attempts
    token.refresh_from_db()
    assert token.last_used_at == first_use

    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    api.get(f"/v1/tasks/{task_id}/status")
    token.refresh_from_db()
    assert timezone.now() - token.last_used_at < timedelta(seconds=10)


@pytest.mark.django_db
def test_tokens_of_inactive_users_are_refused(api):
    api.user.is_active = False
    api.user.save()
    response = api.get("/v1/tasks")
    assert response.status_code == 401 and "detail" in response.json()
