"""The operator admin: task list, filters, search, retry/cancel actions, token revocation."""
from pathlib import Path

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


def test_a_year_outside_the_calendar_in_a_changelist_filter_is_a_400(operator):
    dated = [("videotask", "finished_at"), ("apitoken", "revoked_at"), ("webhookdelivery", "delivered_at")]
    for changelist, lookup in dated:
        for year in ("99999", "0", "-1"):
            assert operator.get(f"/admin/tasks_app/{changelist}/", {f"{lookup}__year": year}).status_code == 400
        assert operator.get(f"/admin/tasks_app/{changelist}/", {f"{lookup}__year": "2026"}).status_code == 200


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

    assert b"Cancelled 1 task" in response.content
    assert b"Not cancelled: 1 task(s): task is already succeed" in response.content
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


def test_resending_sends_only_a_task_s_newest_delivery_of_its_current_state(operator, api, settings):
    """After cancel, retry and succeed, re-sending the superseded "task.cancelled" would tell the
    receiver a succeeded task was cancelled."""
    from tasks_app import webhooks
    from tasks_app.models import WebhookDelivery

    settings.LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = True
    body = {"prompt": "p", "callback_url": "http://127.0.0.1:9/hook"}
    task_id = api.post(SUBMIT, body, format="json").json()["task_id"]
    api.delete(f"/v1/tasks/{task_id}")
    operator.post("/admin/tasks_app/videotask/", {"action": "retry_tasks", "_selected_action": [task_id]}, follow=True)
    VideoTask.objects.filter(pk=task_id).update(status="succeed")
    webhooks.enqueue(VideoTask.objects.get(pk=task_id))
    cancelled, succeeded = WebhookDelivery.objects.filter(task_id=task_id).order_by("created_at")
    WebhookDelivery.objects.filter(pk=succeeded.pk).update(gave_up_at=cancelled.gave_up_at, attempts=5)

    response = operator.post(
        "/admin/tasks_app/webhookdelivery/",
        {"action": "resend_deliveries", "_selected_action": [str(cancelled.pk), str(succeeded.pk)]}, follow=True,
    )

    shown = [str(message) for message in response.context["messages"]]
    assert shown[0] == "Re-sending 1 delivery(ies)." and shown[1].startswith("Not re-sent: 1 delivery(ies)")
    cancelled.refresh_from_db()
    succeeded.refresh_from_db()
    assert cancelled.gave_up_at is not None and cancelled.last_error.startswith("superseded")
    assert (succeeded.gave_up_at, succeeded.attempts, succeeded.event) == (None, 0, "task.succeed")


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


def test_staff_who_may_only_view_get_read_only_pages_and_no_actions(api, client, django_user_model):
    from django.contrib.auth.models import Permission

    task = _task(api, "queued")
    token, _ = ApiToken.issue(user=api.user, name="second")
    viewer = django_user_model.objects.create_user("auditor", password="pw-for-tests", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    client.force_login(viewer)

    assert client.get("/admin/tasks_app/videotask/").status_code == 200
    for changelist, action, pk in [("videotask", "cancel_tasks", task.pk), ("apitoken", "revoke_tokens", token.pk)]:
        client.post(f"/admin/tasks_app/{changelist}/", {"action": action, "_selected_action": [str(pk)]})
    assert VideoTask.objects.get(pk=task.pk).status == "submitted"
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None


def test_a_task_page_is_read_only_even_for_superusers_so_a_save_cannot_undo_a_worker(operator, api):
    """Saving the page would write back every column as loaded, over a worker's finish meanwhile."""
    task = _task(api, "running soon")
    page = operator.get(f"/admin/tasks_app/videotask/{task.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content

    VideoTask.objects.filter(pk=task.pk).update(status="succeed", progress=1.0)  # a worker's write
    assert operator.post(f"/admin/tasks_app/videotask/{task.pk}/change/", {}).status_code == 403
    assert VideoTask.objects.get(pk=task.pk).status == "succeed"
    assert operator.get("/admin/tasks_app/webhookdelivery/").status_code == 200


def test_a_revoked_token_cannot_be_brought_back_from_its_page(operator, api, client):
    token, key = ApiToken.issue(user=api.user, name="leaked")
    operator.post("/admin/tasks_app/apitoken/", {"action": "revoke_tokens", "_selected_action": [str(token.pk)]})

    cleared = {"name": "renamed", "revoked_at_0": "", "revoked_at_1": ""}
    operator.post(f"/admin/tasks_app/apitoken/{token.pk}/change/", cleared)

    token.refresh_from_db()
    assert token.name == "renamed" and token.revoked_at is not None
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401


def test_an_action_that_changes_nothing_says_why_and_claims_no_success(operator, api):
    finished = _task(api, "finished")
    VideoTask.objects.filter(pk=finished.pk).update(status="succeed")

    response = operator.post(
        "/admin/tasks_app/videotask/", {"action": "cancel_tasks", "_selected_action": [str(finished.pk)]}, follow=True
    )

    shown = [str(message) for message in response.context["messages"]]
    assert shown == ["Not cancelled: 1 task(s): task is already succeed"]


def test_deleting_tasks_in_the_admin_removes_their_files(operator, api, django_capture_on_commit_callbacks):
    from django.core.files.base import ContentFile
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tasks_app import storage
    from tests.conftest import png_bytes

    image = SimpleUploadedFile("in.png", png_bytes(), content_type="image/png")
    task_id = api.post("/v1/tasks/video/form", {"prompt": "an i2v task", "image_file": image}).json()["task_id"]
    task = VideoTask.objects.get(pk=task_id)
    for suffix in (".mp4", ".jpg"):
        storage.outputs().save(f"videos/{task_id}{suffix}", ContentFile(b"bytes of a finished run"))
    files = [storage.outputs().path(f"videos/{task_id}{suffix}") for suffix in (".mp4", ".jpg")]
    files.append(storage.uploads().path(task.input_image))
    assert all(Path(file).exists() for file in files)

    with django_capture_on_commit_callbacks(execute=True):
        response = operator.post(
            "/admin/tasks_app/videotask/",
            {"action": "delete_selected", "_selected_action": [task_id], "post": "yes"},
        )

    assert response.status_code == 302 and not VideoTask.objects.filter(pk=task_id).exists()
    assert not any(Path(file).exists() for file in files)
