"""Auth, ownership, listing, cancelling queued tasks, downloads' path rules, health and schema."""
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks_app import selectors, storage
from tasks_app.models import ApiToken, VideoTask, hash_token

SUBMIT = "/v1/tasks/video"


@pytest.fixture
def task_id(api):
    return api.post(SUBMIT, {"prompt": "mine", "height": 64, "width": 64}, format="json").json()["task_id"]


def _finished_video(task_id: str, content: bytes = b"\x00\x00\x00\x18ftypmp42 fake video bytes") -> str:
    """Mark a task succeeded with a video file on disk, as a worker would (the worker path is tested in tests/worker)."""
    public = storage.video_public_path(task_id)
    storage.outputs().save(f"videos/{task_id}.mp4", ContentFile(content))
    VideoTask.objects.filter(task_id=task_id).update(status="succeed", progress=1.0, file_path=public)
    return public


def test_requests_without_a_token_get_401(client):
    for url in ["/v1/tasks", "/v1/tasks/queue/status", f"/v1/tasks/{'0' * 32}/status", "/v1/files/download/x"]:
        response = client.get(url)
        assert response.status_code == 401, url
        assert "detail" in response.json()
    assert client.post(SUBMIT, {"prompt": "p"}, content_type="application/json").status_code == 401


def test_token_keyword_form_and_revoked_tokens(api, client):
    from django.core.management import call_command

    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Token {api.raw_key}").status_code == 200
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    call_command("revoke_api_token", api.raw_key)
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {api.raw_key}").status_code == 401


def test_issued_tokens_never_begin_with_a_dash_and_older_ones_are_revoked_after_a_double_dash(
    db, client, monkeypatch
):
    import secrets

    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    # One key in 64 began with "-", and `revoke_api_token <key>` then read it as an option.
    user = get_user_model().objects.create(username="dash")
    drawn = iter(["-" + "a" * 42, "-" + "b" * 42, "c" * 43])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert ApiToken.issue(user=user)[1] == "c" * 43

    older_key = "-" + "d" * 42  # issued before keys were redrawn
    ApiToken.objects.create(user=user, key_hash=hash_token(older_key), prefix=older_key[:8])
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {older_key}").status_code == 200
    call_command("revoke_api_token", "--", older_key)
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {older_key}").status_code == 401


def test_create_api_token_command_prints_a_working_token(db, client):
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("create_api_token", "carol", stdout=out)
    assert client.get("/v1/tasks", HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip()}").status_code == 200


def test_another_users_task_is_404_everywhere(task_id, make_api):
    public = _finished_video(task_id)
    bob = make_api("bob")
    assert bob.get(f"/v1/tasks/{task_id}/status").status_code == 404
    assert bob.get(f"/v1/tasks/{task_id}/result").status_code == 404
    assert bob.delete(f"/v1/tasks/{task_id}").status_code == 404
    assert bob.get(f"/v1/files/download/{public}").status_code == 404
    assert bob.get("/v1/tasks").json()["count"] == 0


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1", "00000000-0000-0000-0000-000000000000", "%00", "..%2f.."])
def test_unknown_or_malformed_task_ids_are_404_json(api, bad_id):
    response = api.get(f"/v1/tasks/{bad_id}/status")
    assert response.status_code == 404 and response.json() == {"detail": "Not found."}


def test_list_is_newest_first_paginated_and_filtered_by_status(api, make_api):
    ids = [api.post(SUBMIT, {"prompt": f"p{i}"}, format="json").json()["task_id"] for i in range(3)]
    make_api("bob").post(SUBMIT, {"prompt": "not alice's"}, format="json")
    api.delete(f"/v1/tasks/{ids[0]}")

    listing = api.get("/v1/tasks").json()
    assert listing["count"] == 3 and [t["task_id"] for t in listing["results"]] == ids[::-1]
    assert [t["task_id"] for t in api.get("/v1/tasks?status=cancelled").json()["results"]] == [ids[0]]
    assert api.get("/v1/tasks?status=submitted").json()["count"] == 2
    bad = api.get("/v1/tasks?status=done")
    assert bad.status_code == 400 and "status" in bad.json()


def test_a_list_page_gives_each_queued_task_its_status_position_in_a_fixed_number_of_queries(api, make_api, settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 50
    bob = make_api("bob")

    def list_queries() -> int:
        selectors.forget_estimate_inputs()  # cached for seconds: each list computes them afresh
        with CaptureQueriesContext(connection) as queries:
            assert api.get("/v1/tasks").status_code == 200
        return len(queries.captured_queries)

    for index in range(2):
        api.post(SUBMIT, {"prompt": f"alice {index}"}, format="json")
        bob.post(SUBMIT, {"prompt": f"bob {index}"}, format="json")
    queries_for_two = list_queries()
    for index in range(2, 15):
        api.post(SUBMIT, {"prompt": f"alice {index}"}, format="json")
    api.delete(f"/v1/tasks/{api.get('/v1/tasks').json()['results'][0]['task_id']}")  # one not queued

    listed = api.get("/v1/tasks").json()["results"]  # one page of 16
    assert list_queries() == queries_for_two
    statuses = [api.get(f"/v1/tasks/{task['task_id']}/status").json() for task in listed]
    assert [task["queue_position"] for task in listed] == [status["queue_position"] for status in statuses]
    assert listed[0]["queue_position"] is None and listed[-1]["queue_position"] == 1  # cancelled; first queued
    assert sorted(task["queue_position"] for task in listed[1:]) == [1, 3, *range(5, 17)]  # bob's are 2 and 4


def test_cancelling_the_id_video_is_a_documented_405(api, client, db):
    response = api.delete("/v1/tasks/video")  # the submit's path, not a task
    assert response.status_code == 405 and response.json() == {"detail": 'Method "DELETE" not allowed.'}
    schema = client.get("/openapi.json").json()
    assert "405" in schema["paths"]["/v1/tasks/{task_id}"]["delete"]["responses"]


def test_cancelling_a_queued_task_is_immediate_and_final(api, task_id):
    response = api.delete(f"/v1/tasks/{task_id}")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    again = api.delete(f"/v1/tasks/{task_id}")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert VideoTask.objects.get(task_id=task_id).finished_at is not None


def test_result_before_success_is_409_with_the_status_body(api, task_id):
    response = api.get(f"/v1/tasks/{task_id}/result")
    assert response.status_code == 409 and response.json()["status"] == "submitted"


def test_result_and_download_stream_the_same_bytes(api, task_id):
    public = _finished_video(task_id, b"video-bytes" * 100)
    status = api.get(f"/v1/tasks/{task_id}/status").json()
    assert status["file_path"] == public and status["result_url"].endswith(f"/v1/tasks/{task_id}/result")

    result = api.get(f"/v1/tasks/{task_id}/result")
    download = api.get(f"/v1/files/download/{public}")
    assert result.status_code == download.status_code == 200
    assert result["Content-Type"] == "video/mp4"
    assert b"".join(result.streaming_content) == b"".join(download.streaming_content) == b"video-bytes" * 100


def test_download_refuses_a_symlink_even_for_the_owner(api, task_id, tmp_path):
    public = _finished_video(task_id)
    target = Path(storage.outputs().path(f"videos/{task_id}.mp4"))
    target.unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    target.symlink_to(secret)
    assert api.get(f"/v1/files/download/{public}").status_code == 404


def test_queue_status_counts_per_status(api, task_id):
    body = api.get("/v1/tasks/queue/status").json()
    assert body["counts"]["submitted"] == 1 and body["counts"]["succeed"] == 0
    assert set(body["counts"]) == {"submitted", "running", "succeed", "failed", "cancelled"}
    assert body["live_workers"] == 0


def test_live_workers_counts_a_cluster_listed_after_one_that_just_stopped(api):
    from django_q.brokers import get_broker
    from django_q.conf import Conf
    from django_q.signing import SignedPackage
    from django_q.status import Status

    cache = get_broker().cache
    stopped, running = Status(pid=11, cluster_id="stopped"), Status(pid=12, cluster_id="running")
    stopped.workers, running.workers = [21], [22, 23]
    cache.set(Conf.Q_STAT, [f"{Conf.Q_STAT}:stopped", f"{Conf.Q_STAT}:running"], None)
    cache.set(f"{Conf.Q_STAT}:stopped", SignedPackage.dumps(stopped, True), 0)  # its 3 s are over
    cache.set(f"{Conf.Q_STAT}:running", SignedPackage.dumps(running, True), 30)

    for _ in range(2):  # reading changes nothing: the next read sees the same
        assert api.get("/v1/tasks/queue/status").json()["live_workers"] == 2
    assert api.get("/v1/service/status").json()["live_workers"] == 2


def test_service_status_and_metadata_need_no_token(client, db):
    health = client.get("/v1/service/status")
    assert health.status_code == 200 and health.json()["database"] is True
    metadata = client.get("/v1/service/metadata").json()
    assert metadata["defaults"]["infer_steps"] == 4 and metadata["defaults"]["width"] == 832
    # Each default has the type of its field: what a client gets by leaving the field out.
    assert (metadata["defaults"]["sample_shift"], metadata["defaults"]["step_cache"]) == (5.0, "none")
    assert metadata["models"]["t2v"] == "t2v"


def test_openapi_schema_and_docs_are_served(client, db):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ["/v1/tasks/video", "/v1/tasks/video/form", "/v1/tasks/{task_id}/status", "/v1/files/download/{file_path}"]:
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/tasks/video/form"]["post"]["requestBody"]["content"]
    assert "video/mp4" in schema["paths"]["/v1/tasks/{task_id}/result"]["get"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 200


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "body"),
    [
        ("bytes=0-3", 206, "bytes 0-3/1000", b"0123"),
        ("BYTES = 0 - 3", 206, "bytes 0-3/1000", b"0123"),  # the unit is case-insensitive; spaces allowed
        ("bytes=\u0661-3", 200, None, None),  # only ASCII digits
        ("bytes=995-", 206, "bytes 995-999/1000", b"56789"),
        ("bytes=-3", 206, "bytes 997-999/1000", b"789"),
        ("bytes=990-5000", 206, "bytes 990-999/1000", b"0123456789"),
        ("bytes=1000-", 416, "bytes */1000", None),
        ("bytes=5-2", 200, None, None),  # not a usable range: the whole file
        ("items=0-3", 200, None, None),
        ("bytes=" + "9" * 5000 + "-", 416, "bytes */1000", None),  # past Python's int() digit limit
        ("bytes=0-" + "9" * 5000, 206, "bytes 0-999/1000", b"0123456789" * 100),
        ("bytes=-" + "9" * 5000, 206, "bytes 0-999/1000", b"0123456789" * 100),
        ("bytes=" + "0" * 5000 + "2-3", 206, "bytes 2-3/1000", b"23"),
    ],
)
def test_both_downloads_honour_range_requests(api, task_id, range_header, status, content_range, body):
    content = b"0123456789" * 100
    public = _finished_video(task_id, content)
    for url in (f"/v1/tasks/{task_id}/result", f"/v1/files/download/{public}"):
        response = api.get(url, HTTP_RANGE=range_header)

        assert response.status_code == status, url
        assert response["Accept-Ranges"] == "bytes"
        assert response.get("Content-Range") == content_range
        if status == 206:
            assert b"".join(response.streaming_content) == body and response["Content-Length"] == str(len(body))
        elif status == 200:
            assert b"".join(response.streaming_content) == content


def test_status_gives_an_eta_from_recent_tasks(api, task_id):
    from datetime import timedelta

    from django.utils import timezone

    assert api.get(f"/v1/tasks/{task_id}/status").json()["eta_s"] is None  # no history yet
    done = api.post(SUBMIT, {"prompt": "done"}, format="json").json()["task_id"]
    now = timezone.now()
    VideoTask.objects.filter(task_id=done).update(
        status="succeed", started_at=now - timedelta(seconds=20), finished_at=now
    )
    selectors.forget_estimate_inputs()  # kept per process for ESTIMATE_INPUTS_TTL_S; this test does not wait
    assert api.get(f"/v1/tasks/{task_id}/status").json()["eta_s"] == 20.0  # next in line, 20 s per task
    busy = api.post(SUBMIT, {"prompt": "running"}, format="json").json()["task_id"]
    VideoTask.objects.filter(task_id=busy).update(status="running", run_stats={"step_s": 2.0, "steps_done": 1})
    selectors.forget_estimate_inputs()
    assert api.get(f"/v1/tasks/{task_id}/status").json()["eta_s"] == 26.0  # the one worker's 6 s left first
    VideoTask.objects.filter(task_id=busy).update(status="succeed", started_at=now, finished_at=now)

    VideoTask.objects.filter(task_id=task_id).update(status="running", run_stats={"step_s": 1.5, "steps_done": 1})
    assert api.get(f"/v1/tasks/{task_id}/status").json()["eta_s"] == 4.5  # 3 of its 4 steps left


@pytest.mark.parametrize("running_left, workers, ahead, free_after", [
    ([], 1, 0, 0.0),             # an idle worker takes it at once
    ([10.0], 2, 0, 0.0),         # one of two workers is idle
    ([10.0], 1, 0, 10.0),        # the only worker first finishes its run
    ([10.0], 2, 1, 10.0),        # the idle worker takes the one ahead; the busy one is free at 10 s
    ([10.0, 30.0], 2, 2, 30.0),  # 10 -> the first ahead (till 30), 30 -> the second; then 30 again
    ([], 2, 3000, 30_000.0),     # a long queue: shared out between the workers
])
def test_a_queued_task_waits_for_the_first_worker_free_after_the_runs_and_tasks_ahead(
    running_left, workers, ahead, free_after
):
    assert selectors._worker_free_after(running_left, workers, ahead, 20.0) == free_after


def test_a_task_id_is_found_only_in_its_canonical_spelling(api, task_id):
    fullwidth_first = "%EF%BC%" + format(0x90 + int(task_id[0], 16), "X") if task_id[0].isdigit() else None
    spellings = [f"{{{task_id}}}", f"urn:uuid:{task_id}", task_id.replace("-", "")]
    if fullwidth_first:
        spellings.append(fullwidth_first + task_id[1:])
    assert api.get(f"/v1/tasks/{task_id.upper()}/status").status_code == 200  # hex digits in either case
    for spelling in spellings:
        response = api.get(f"/v1/tasks/{spelling}/status")
        assert response.status_code == 404, spelling
        assert api.delete(f"/v1/tasks/{spelling}").status_code == 404, spelling
    assert api.get(f"/v1/tasks/{task_id}/status").json()["status"] == "submitted"  # no cancel got through


@pytest.mark.parametrize("accept", ["video/mp4", "video/*", "text/html", "application/xml"])
def test_any_accept_header_gets_the_video_or_a_json_answer(api, task_id, client, accept):
    """A player's Accept: video/mp4 gets the video (DRF answered 406); HTML or XML asks get JSON, errors too."""
    queued = api.get(f"/v1/tasks/{task_id}/result", HTTP_ACCEPT=accept)
    assert (queued.status_code, queued["Content-Type"], queued.json()["status"]) == (409, "application/json", "submitted")
    for fmt in ("xml", "api", "json"):  # a ?format= picks nothing either (DRF answered 404 for the task)
        assert api.get(f"/v1/tasks/{task_id}/status?format={fmt}").json()["status"] == "submitted"
    missing = api.get(f"/v1/tasks/{'0' * 8}-0000-4000-8000-{'0' * 12}/status", HTTP_ACCEPT=accept)
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not found."})
    assert client.get("/v1/tasks", HTTP_ACCEPT=accept).json()["detail"]  # 401, no token
    bad = api.post(SUBMIT, {"prompt": ""}, format="json", HTTP_ACCEPT=accept)
    assert bad.status_code == 400 and "prompt" in bad.json()

    public = _finished_video(task_id)
    for url in (f"/v1/tasks/{task_id}/result", f"/v1/files/download/{public}"):
        video = api.get(url, HTTP_ACCEPT=accept)
        assert (video.status_code, video["Content-Type"]) == (200, "video/mp4")
        assert b"".join(video.streaming_content).startswith(b"\x00\x00\x00\x18ftyp")


def test_the_result_of_a_succeeded_task_whose_file_was_removed_is_gone_not_pending(api, task_id):
    """A 409 tells a client to keep polling; a video removed from storage will never come back."""
    public = _finished_video(task_id)
    storage.outputs().delete(f"videos/{task_id}.mp4")

    response = api.get(f"/v1/tasks/{task_id}/result")

    assert (response.status_code, response.json()) == (410, {"detail": "the video of this task is no longer stored"})
    assert api.get(f"/v1/files/download/{public}").status_code == 404
    assert api.get(f"/v1/tasks/{task_id}/status").json()["status"] == "succeed"


def test_the_task_list_pages_by_twenty(api, settings):
    settings.LIGHTX2V_MAX_UNFINISHED_PER_USER = 100
    ids = [api.post(SUBMIT, {"prompt": f"p{i}"}, format="json").json()["task_id"] for i in range(23)]

    first, last = api.get("/v1/tasks").json(), api.get("/v1/tasks?page=last").json()

    assert first["count"] == 23 and len(first["results"]) == 20 and first["next"].endswith("page=2")
    assert [task["task_id"] for task in first["results"] + api.get(first["next"]).json()["results"]] == ids[::-1]
    assert last["results"] == api.get("/v1/tasks?page=2").json()["results"] and last["next"] is None


def test_api_paths_take_a_trailing_slash(api, task_id):
    created = api.post(SUBMIT + "/", {"prompt": "slashed"}, format="json")
    assert created.status_code == 201
    for url in ("/v1/tasks/", f"/v1/tasks/{task_id}/status/", "/v1/tasks/queue/status/", "/v1/service/metadata/"):
        assert api.get(url).status_code == 200, url
    assert api.get(f"/v1/tasks/{task_id}/result/").status_code == 409
    assert api.delete(f"/v1/tasks/{created.json()['task_id']}/").json()["status"] == "cancelled"
    assert api.get("/v1/tasks//").status_code == 404


@pytest.mark.parametrize("debug", [False, True])
def test_unknown_urls_get_the_json_404_with_debug_on_too(client, db, settings, debug):
    settings.DEBUG = debug  # make run's default: Django's HTML "Page not found" page answered before
    for url in ("/nowhere", "/v2/tasks", "/v1/tasks/x/y/z", "/admin-ish"):
        response = client.get(url, HTTP_ACCEPT="application/json")
        assert (response.status_code, response["Content-Type"], response.json()) == (
            404, "application/json", {"detail": "Not found."}), url  # fmt: skip
    assert client.get("/admin").status_code == 301  # still sent on to /admin/
