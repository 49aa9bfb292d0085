"""Prometheus /metrics: the series operators alert on, and who may read them; read-only pages refuse other methods in JSON."""
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from tasks_app.models import TaskAttempt, VideoTask

SUBMIT = "/v1/tasks/video"


def _finish(task_id: str, *, status: str, seconds: float, step_s: float) -> None:
    """Give a task the row a worker leaves behind (the worker path itself is tested in tests/worker)."""
    started = timezone.now() - timedelta(seconds=seconds)
    VideoTask.objects.filter(task_id=task_id).update(
        status=status, started_at=started, finished_at=timezone.now(), run_stats={"step_s": step_s}, attempt_count=1
    )
    TaskAttempt.objects.create(task_id=task_id, number=1, worker_name="host:1", outcome=status)


def test_metrics_expose_queue_depth_durations_step_time_failures_and_workers(api, client):
    ids = [api.post(SUBMIT, {"prompt": f"p{i}"}, format="json").json()["task_id"] for i in range(4)]
    _finish(ids[0], status="succeed", seconds=3, step_s=0.5)
    _finish(ids[1], status="failed", seconds=1, step_s=0.25)
    VideoTask.objects.filter(task_id=ids[2]).update(status="running", heartbeat_at=timezone.now(), worker_name="gpu-1:7")

    response = client.get("/metrics")

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    for line in [
        'lightx2v_tasks{status="submitted"} 1.0',
        'lightx2v_tasks{status="running"} 1.0',
        'lightx2v_tasks{status="succeed"} 1.0',
        "lightx2v_task_failures_total 1.0",
        'lightx2v_attempts_total{outcome="failed"} 1.0',
        'lightx2v_task_duration_seconds_bucket{le="1.0"} 0.0',
        'lightx2v_task_duration_seconds_bucket{le="5.0"} 1.0',
        "lightx2v_task_duration_seconds_count 1.0",
        "lightx2v_recent_step_seconds 0.5",
        "lightx2v_live_workers 0.0",
    ]:
        assert line in text, line
    assert 'lightx2v_worker_heartbeat_age_seconds{worker="gpu-1:7"}' in text


def test_metrics_need_the_token_when_one_is_set(client, db, settings):
    settings.LIGHTX2V_METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 404
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200


def test_metrics_without_a_token_answer_loopback_only(client, db):
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 404
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200


@pytest.mark.parametrize("url", ["/metrics", "/docs", "/redoc"])
def test_read_only_pages_answer_other_methods_with_a_json_405(db, url):
    """A POST is refused in JSON like the rest of the API, not with Django's HTML CSRF page."""
    client = Client(enforce_csrf_checks=True)
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response = client.generic(method, url)
        assert (response.status_code, response["Allow"], response.json()) == (
            405, "GET, HEAD", {"detail": f'Method "{method}" not allowed.'}
        ), method  # fmt: skip
    assert client.head(url).status_code == 200
    if url == "/metrics":
        assert client.post(url, REMOTE_ADDR="10.1.2.3").status_code == 404  # not told it exists
