"""Idempotency-Key, per-user and global caps, and production settings, through HTTP."""
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone

from tasks_app import statements
from tasks_app.models import IdempotencyKey, VideoTask
from tests.conftest import REPO_ROOT, png_bytes

SUBMIT = "/v1/tasks/video"
SUBMIT_FORM = "/v1/tasks/video/form"
BODY = {"prompt": "a lighthouse", "height": 64, "width": 64, "seed": 7}


def _submit(api, body=BODY, key="key-1"):
    return api.post(SUBMIT, body, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_same_key_and_body_returns_the_original_task_with_200(api):
    first = _submit(api)
    again = _submit(api, body=dict(reversed(list(BODY.items()))))  # key order does not matter

    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again["Location"] == first["Location"]
    assert VideoTask.objects.count() == 1


def test_same_key_with_another_body_is_422_and_creates_nothing(api):
    _submit(api)
    response = _submit(api, body={**BODY, "seed": 8})
    assert response.status_code == 422 and "Idempotency-Key" in response.json()["detail"]
    assert VideoTask.objects.count() == 1


def test_keys_are_per_user(api, make_api):
    mine, theirs = _submit(api), _submit(make_api("bob"))
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["task_id"] != theirs.json()["task_id"]


def test_a_key_expires_after_a_day(api):
    first = _submit(api)
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=24, seconds=1))

    later = _submit(api, body={**BODY, "seed": 9})

    assert later.status_code == 201 and later.json()["task_id"] != first.json()["task_id"]
    assert IdempotencyKey.objects.get().task_id == VideoTask.objects.get(seed=9).task_id


def test_multipart_idempotency_compares_the_uploaded_bytes(api):
    def send(image: bytes):
        upload = SimpleUploadedFile("in.png", image, content_type="image/png")
        return api.post(SUBMIT_FORM, {"prompt": "p", "image_file": upload}, HTTP_IDEMPOTENCY_KEY="form-key")

    first, same, other = send(png_bytes()), send(png_bytes()), send(png_bytes(color=(0, 0, 255)))
    assert (first.status_code, same.status_code, other.status_code) == (201, 200, 422)
    assert same.json()["task_id"] == first.json()["task_id"]


def test_an_image_is_kept_only_for_the_task_it_made(api, settings):
    """Input images are stored before the submit's transaction: a replay or a refused submit keeps none."""
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 1
    upload_root = Path(settings.LIGHTX2V_UPLOAD_ROOT)
    before = set(upload_root.iterdir()) if upload_root.exists() else set()

    def send(color, key):
        upload = SimpleUploadedFile("in.png", png_bytes(color=color), content_type="image/png")
        return api.post(SUBMIT_FORM, {"prompt": "p", "image_file": upload}, HTTP_IDEMPOTENCY_KEY=key)

    first, replay, refused = send((1, 2, 3), "a"), send((1, 2, 3), "a"), send((4, 5, 6), "b")

    assert (first.status_code, replay.status_code, refused.status_code) == (201, 200, 429)
    task = VideoTask.objects.get()
    assert {path.name for path in set(upload_root.iterdir()) - before} == {task.input_image} == {f"{task.pk}.png"}


def test_an_image_of_a_submit_the_database_refuses_is_removed(api, settings):
    upload_root = Path(settings.LIGHTX2V_UPLOAD_ROOT)
    before = set(upload_root.iterdir()) if upload_root.exists() else set()
    with connection.cursor() as cursor:  # rolled back with the test's transaction
        cursor.execute("""
            CREATE FUNCTION test_refuse_insert() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'refused by a test'; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER test_refuse_insert BEFORE INSERT ON tasks_app_videotask
            FOR EACH ROW EXECUTE FUNCTION test_refuse_insert();""")
    api.raise_request_exception = False
    upload = SimpleUploadedFile("in.png", png_bytes(), content_type="image/png")

    response = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": upload})

    assert response.status_code == 500
    assert (set(upload_root.iterdir()) if upload_root.exists() else set()) == before


def test_a_malformed_key_is_a_400_naming_the_header(api):
    response = _submit(api, key="has spaces in it")
    assert response.status_code == 400 and "Idempotency-Key" in response.json()
    assert _submit(api, key="k" * 256).status_code == 400
    assert not VideoTask.objects.exists()


@pytest.fixture(params=["statement", "orm"])
def cap_check_form(request, monkeypatch):
    """The owner lock and cap counts as PostgreSQL statements, or in the ORM form other databases get."""
    if request.param == "orm":
        monkeypatch.setattr(statements, "supported", lambda: False)
    return request.param


def test_per_user_cap_on_unfinished_tasks_is_429_with_retry_after(api, make_api, settings, cap_check_form):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 2
    first = api.post(SUBMIT, BODY, format="json").json()["task_id"]
    api.post(SUBMIT, BODY, format="json")

    refused = api.post(SUBMIT, BODY, format="json")

    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "limit is 2" in refused.json()["detail"]
    assert make_api("bob").post(SUBMIT, BODY, format="json").status_code == 201  # others are unaffected
    api.delete(f"/v1/tasks/{first}")  # a finished task frees a slot
    assert api.post(SUBMIT, BODY, format="json").status_code == 201


def test_concurrent_submits_of_one_user_never_pass_the_cap_together(live_server, make_api, settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 2
    raw_key = make_api("carol").raw_key
    start_line = threading.Barrier(6)
    codes = []

    def submit():
        with requests.Session() as session:
            start_line.wait()
            response = session.post(
                f"{live_server.url}{SUBMIT}", json=BODY, headers={"Authorization": f"Bearer {raw_key}"}, timeout=30
            )
            codes.append(response.status_code)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [201, 201, 429, 429, 429, 429]
    assert VideoTask.objects.filter(owner__username="carol").count() == 2


def test_an_idempotent_replay_is_not_refused_by_the_cap(api, settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 1
    assert _submit(api).status_code == 201
    assert _submit(api).status_code == 200


def test_global_queue_cap_is_503_with_retry_after(api, make_api, settings, cap_check_form):
    settings.LIGHTX2V_MAX_QUEUED = 2
    make_api("bob").post(SUBMIT, BODY, format="json")
    api.post(SUBMIT, BODY, format="json")

    refused = api.post(SUBMIT, BODY, format="json")

    assert refused.status_code == 503 and int(refused["Retry-After"]) > 0
    assert VideoTask.objects.count() == 2


def test_declared_oversized_body_is_413_before_it_is_read(api, settings):
    settings.LIGHTX2V_MAX_UPLOAD_BYTES = 1000
    boundary = "b0undary"
    response = api.generic(
        "POST",
        SUBMIT_FORM,
        data=b"",  # nothing follows: the declared length alone must be refused
        content_type=f"multipart/form-data; boundary={boundary}",
        CONTENT_LENGTH=str(50 * 1024 * 1024),
    )
    assert response.status_code == 413 and "image_file" in response.json()["detail"]


def test_server_errors_are_json_without_a_traceback(api, monkeypatch):
    from tasks_app import selectors

    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(selectors, "status_counts", broken)
    api.raise_request_exception = False

    response = api.get("/v1/tasks/queue/status")

    assert response.status_code == 500 and response.json() == {"detail": "Internal server error."}
    assert b"secret internals" not in response.content and b"Traceback" not in response.content


def test_check_deploy_passes_with_the_documented_production_environment():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings",
        "DEBUG": "0",
        "LIGHTX2V_HTTPS": "1",
        "ALLOWED_HOSTS": "video.example.com",
        "SECRET_KEY": "k3J9x-" + "Zq7Lm2Np8Rt4Vw6Yb1Cd5Fg0Hj3Kl9Mn7Pq2Rs8Tu4Vx6Wz1",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_anonymous_opt_in_is_refused_when_debug_is_off():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings", "DEBUG": "0"}
    env["LIGHTX2V_ALLOW_ANONYMOUS"] = "1"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "LIGHTX2V_ALLOW_ANONYMOUS" in result.stderr


@pytest.mark.parametrize(("variables", "named"), [
    ({"LIGHTX2V_STORAGE": "S3"}, "LIGHTX2V_STORAGE"),
    ({"LIGHTX2V_STORAGE": "s3"}, "LIGHTX2V_S3_BUCKET"),  # no bucket
    ({"LIGHTX2V_DEVICE": "gpu"}, "LIGHTX2V_DEVICE"),
])
def test_a_misconfigured_server_stops_at_check_naming_the_setting(variables, named):
    """Not at the first request or task: ``manage.py check`` (and every start) fails with the setting's name."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings", "DEBUG": "1", **variables}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "ImproperlyConfigured" in result.stderr and named in result.stderr


def test_empty_input_roots_allow_no_server_side_paths():
    code = "from django.conf import settings; print(settings.LIGHTX2V_INPUT_ROOTS)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "lightx2v_site.settings", "DEBUG": "1", "LIGHTX2V_INPUT_ROOTS": ""}
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_an_upload_cut_off_at_the_limit_leaves_no_temporary_file(api, settings, tmp_path):
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    settings.LIGHTX2V_MAX_UPLOAD_BYTES = 3 * 1024 * 1024  # over FILE_UPLOAD_MAX_MEMORY_SIZE: a temp file

    too_big = SimpleUploadedFile("big.png", png_bytes(64, 64) + b"\0" * settings.LIGHTX2V_MAX_UPLOAD_BYTES)

    response = api.post("/v1/tasks/video/form", {"prompt": "p", "image_file": too_big})

    assert response.status_code == 413 and "image_file" in response.json()["detail"]
    assert list(tmp_path.iterdir()) == []
