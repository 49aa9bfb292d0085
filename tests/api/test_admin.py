"""The operator admin: task list, filters, search, retry/cancel actions, token revocation."""
import pytest

from tasks_app.models import ApiToken, VideoTask

SUBMIT = "/v1/tasks/video"


@pytest.fixture
def operator(client, django_user_model):
    staff = django_user_model.objects.create_superuser("operator", password="pw-for-tests")
    client.force_login(staff)
    return client


def _task(api, prompt: str) -> VideoTask:
    return VideoTask.objects.get(task_id=api.post(SUBMIT, {"prompt": prompt}, format="json").json()["task_id"])


def test_task_list_shows_filters_and_searches(operator, api):
    _task(api, "a red balloon")
    _task(api, "a blue whale")

    page = operator.get("/admin/tasks_app/videotask/", {"q": "balloon"})

    assert page.status_code == 200
    assert b"1 result" in page.content
    assert operator.get("/admin/tasks_app/videotask/", {"status__exact": "failed"}).status_code == 200
    for query in ({"status__exact": "\x00"}, {"q": "a\x00b"}, {"o\x00": "1"}):  # PostgreSQL refuses NUL in text
        refused = operator.get("/admin/tasks_app/videotask/", query)
        assert refused.status_code == 400 and "NUL" in refused.json()["detail"], query


def test_retry_action_requeues_failed_tasks_keeping_attempts(operator, api):
    task = _task(api, "doomed")
    VideoTask.objects.filter(pk=task.pk).update(status="failed", attempt_count=1, progress=0.5, message="failed: boom")

    response = operator.post(
        "/admin/tasks_app/videotask/",
        {"action": "retry_tasks", "_selected_action": [str(task.pk)]},
        follow=True,
    )

    assert response.status_code == 200 and b"Queued again 1 task" in response.content
    task.refresh_from_db()
    assert (task.status, task.attempt_count, task.progress) == ("submitted", 1, 0.0)


def test_cancel_action_cancels_queued_and_reports_the_refused(operator, api):
    queued, finished = _task(api, "queued"), _task(api, "finished")
    VideoTask.objects.filter(pk=finished.pk).update(status="succeed")

    response = operator.post(
        "/admin/tasks_app/videotask/",
        {"action": "cancel_tasks", "_selected_action": [str(queued.pk), str(finished.pk)]},
        follow=True,
    )

    assert b"Cancelled 1 task" in response.content and b"1 task(s) were not in a state" in response.content
    assert VideoTask.objects.get(pk=queued.pk).status == "cancelled"
    assert VideoTask.objects.get(pk=finished.pk).status == "succeed"


def test_revoking_one_of_several_tokens_in_the_admin(operator, api, client):
    other_token, other_key = ApiToken.issue(user=api.user, name="second")

    operator.post(
        "/admin/tasks_app/apitoken/", {"action": "revoke_tokens", "_selected_action": [str(other_token.pk)]}
    )

    assert api.get("/v1/tasks").status_code == 200  # the first token still works
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {other_key}").status_code == 401


def test_retry_drops_the_undelivered_webhook_of_the_earlier_end(operator, api, settings):
    """A retried task's pending "task.cancelled" would otherwise reach the receiver after its new outcome."""
    from tasks_app.models import WebhookDelivery

    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = True
    response = api.post(SUBMIT, {"prompt": "p", "callback_url": "http://127.0.0.1:9/hook"}, format="json")
    task_id = response.json()["task_id"]
    assert api.delete(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"
    [stale] = WebhookDelivery.objects.filter(task_id=task_id)
    assert stale.gave_up_at is None  # the receiver is down: the delivery waits for its retry

    operator.post("/admin/tasks_app/videotask/", {"action": "retry_tasks", "_selected_action": [task_id]})
    assert api.delete(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"  # the retried run's own end

    stale.refresh_from_db()
    assert stale.gave_up_at is not None and stale.last_error == "superseded: the task was retried"
    pending = WebhookDelivery.objects.filter(task_id=task_id, gave_up_at__isnull=True)
    assert [delivery.event for delivery in pending] == ["task.cancelled"] and pending[0].pk != stale.pk


def test_task_media_need_the_permission_to_view_tasks(api, client, django_user_model):
    from django.contrib.auth.models import Permission
    from django.core.files.base import ContentFile

    from tasks_app import storage

    task = _task(api, "a private video")
    storage.outputs().save(f"videos/{task.pk}.mp4", ContentFile(b"\x00\x00\x00\x18ftypmp42"))
    VideoTask.objects.filter(pk=task.pk).update(status="succeed", file_path=storage.video_public_path(task.pk))
    staff = django_user_model.objects.create_user("helpdesk", password="pw-for-tests", is_staff=True)
    client.force_login(staff)
    url = f"/admin/tasks_app/videotask/{task.pk}/media/video/"

    assert client.get(url).status_code == 403  # staff, but not allowed to see tasks

    staff.user_permissions.add(Permission.objects.get(codename="view_videotask"))
    assert client.get(url).status_code == 200
