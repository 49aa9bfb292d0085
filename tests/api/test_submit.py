"""Submitting tasks: defaults, recorded seed, I2V inputs, and every rule of API.md's submit table."""
import base64

import pytest

from tasks_app.models import VideoTask
from tests.conftest import png_bytes

SUBMIT = "/v1/tasks/video"
SUBMIT_FORM = "/v1/tasks/video/form"


def test_submit_json_creates_a_queued_task_with_the_documented_defaults(api):
    response = api.post(SUBMIT, {"prompt": "  a cat surfing  "}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "submitted" and body["message"] == "Task created successfully"
    assert response["Location"] == f"/v1/tasks/{body['task_id']}/status"
    task = VideoTask.objects.get(task_id=body["task_id"])
    assert task.owner == api.user and task.prompt == "a cat surfing" and task.task_type == "t2v"
    assert (task.infer_steps, task.video_duration, task.height, task.width) == (4, 5, 480, 832)
    assert (task.num_fragments, task.guidance_scale, task.negative_prompt) == (1, 1.0, "")
    assert 0 <= task.seed <= 2**32 - 1


def test_status_reports_the_parameters_as_used_including_a_drawn_seed(api):
    task_id = api.post(SUBMIT, {"prompt": "p", "height": 64, "width": 96}, format="json").json()["task_id"]

    status = api.get(f"/v1/tasks/{task_id}/status").json()

    task = VideoTask.objects.get(task_id=task_id)
    assert status["seed"] == task.seed and status["height"] == 64 and status["width"] == 96
    assert status["status"] == "submitted" and status["progress"] == 0.0 and status["queue_position"] == 1
    assert status["task_type"] == "t2v" and status["file_path"] == "" and status["result_url"] is None


def test_queue_position_counts_tasks_queued_earlier(api, make_api):
    other = make_api("bob")
    first = other.post(SUBMIT, {"prompt": "first"}, format="json").json()["task_id"]
    second = api.post(SUBMIT, {"prompt": "second"}, format="json").json()["task_id"]

    assert other.get(f"/v1/tasks/{first}/status").json()["queue_position"] == 1
    assert api.get(f"/v1/tasks/{second}/status").json()["queue_position"] == 2


def test_given_seed_is_kept(api):
    task_id = api.post(SUBMIT, {"prompt": "p", "seed": 2**32 - 1}, format="json").json()["task_id"]
    assert VideoTask.objects.get(task_id=task_id).seed == 2**32 - 1


def test_image_path_inside_an_input_root_makes_an_i2v_task(api, input_root):
    (input_root / "cat.png").write_bytes(png_bytes())

    response = api.post(SUBMIT, {"prompt": "p", "image_path": "cat.png"}, format="json")

    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    assert task.task_type == "i2v" and task.input_image == f"{task.task_id}.png"


def test_data_url_image_makes_an_i2v_task(api):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    response = api.post(SUBMIT, {"prompt": "p", "image_path": data_url}, format="json")
    assert response.status_code == 201, response.json()
    assert VideoTask.objects.get(task_id=response.json()["task_id"]).task_type == "i2v"


def test_multipart_upload_makes_an_i2v_task_stored_under_a_server_name(api, settings):
    upload = _upload("../../evil name.png", png_bytes())
    response = api.post(SUBMIT_FORM, {"prompt": "p", "height": "64", "width": "64", "image_file": upload})

    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    assert task.task_type == "i2v" and task.height == 64
    assert (settings.LIGHTX2V_UPLOAD_ROOT / f"{task.task_id}.png").is_file()


def test_multipart_without_image_is_t2v(api):
    response = api.post(SUBMIT_FORM, {"prompt": "p"})
    assert response.status_code == 201
    assert VideoTask.objects.get(task_id=response.json()["task_id"]).task_type == "t2v"


def _upload(name: str, content: bytes, content_type: str = "image/png"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content, content_type=content_type)


BAD_JSON_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "p", "negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"prompt": "p", "infer_steps": 0}, "infer_steps"),
    ({"prompt": "p", "infer_steps": 51}, "infer_steps"),
    ({"prompt": "p", "infer_steps": "four"}, "infer_steps"),
    ({"prompt": "p", "infer_steps": 2.5}, "infer_steps"),
    ({"prompt": "p", "infer_steps": True}, "infer_steps"),
    ({"prompt": "p", "video_duration": 0}, "video_duration"),
    ({"prompt": "p", "video_duration": 11}, "video_duration"),
    ({"prompt": "p", "seed": -1}, "seed"),
    ({"prompt": "p", "seed": 2**32}, "seed"),
    ({"prompt": "p", "height": 470}, "height"),
    ({"prompt": "p", "height": 0}, "height"),
    ({"prompt": "p", "width": 1296}, "width"),
    ({"prompt": "p", "width": 8}, "width"),
    ({"prompt": "p", "height": 1280, "width": 1280}, "height"),
    ({"prompt": "p", "num_fragments": 0}, "num_fragments"),
    ({"prompt": "p", "num_fragments": 9}, "num_fragments"),
    ({"prompt": "p", "guidance_scale": 0.5}, "guidance_scale"),
    ({"prompt": "p", "guidance_scale": "NaN"}, "guidance_scale"),
    ({"prompt": "p", "guidance_scale": 21}, "guidance_scale"),
    ({"prompt": "p", "image_path": "/etc/passwd"}, "image_path"),
    ({"prompt": "p", "image_path": "../../../../etc/passwd"}, "image_path"),
    ({"prompt": "p", "image_path": "missing.png"}, "image_path"),
    ({"prompt": "p", "image_path": "http://169.254.169.254/latest/meta-data"}, "image_path"),
    ({"prompt": "p", "image_path": "data:image/png;base64,not-base64!!"}, "image_path"),
    ({"prompt": "p", "image_path": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, "image_path"),
    ({"prompt": "p", "image_path": "data:text/plain;base64,aGVsbG8="}, "image_path"),
]


@pytest.mark.parametrize(("body", "field"), BAD_JSON_BODIES)
def test_bad_json_field_is_a_400_naming_the_field(api, body, field):
    response = api.post(SUBMIT, body, format="json")

    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not VideoTask.objects.exists()


def test_non_image_file_inside_an_input_root_is_refused(api, input_root):
    (input_root / "notes.png").write_bytes(b"just text pretending")
    response = api.post(SUBMIT, {"prompt": "p", "image_path": "notes.png"}, format="json")
    assert response.status_code == 400 and "image_path" in response.json()


def test_symlink_out_of_an_input_root_is_refused(api, input_root, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (input_root / "link.png").symlink_to(outside)
    response = api.post(SUBMIT, {"prompt": "p", "image_path": "link.png"}, format="json")
    assert response.status_code == 400 and "image_path" in response.json()


def test_malformed_json_is_a_400(api):
    response = api.post(SUBMIT, data='{"prompt": "p",', content_type="application/json")
    assert response.status_code == 400 and "detail" in response.json()


def test_json_endpoint_refuses_other_content_types_with_415(api):
    response = api.post(SUBMIT, data="prompt=p", content_type="text/plain")
    assert response.status_code == 415 and "detail" in response.json()


def test_non_image_upload_is_a_400_naming_image_file(api):
    response = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": _upload("x.png", b"GIF89a nonsense")})
    assert response.status_code == 400 and "image_file" in response.json()
    assert not VideoTask.objects.exists()


def test_oversized_upload_is_a_413(api, settings):
    settings.LIGHTX2V_MAX_UPLOAD_BYTES = 1000
    response = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": _upload("big.png", png_bytes(400, 400))})
    assert response.status_code == 413 and "image_file" in response.json()["detail"]


def test_bad_form_number_is_a_400_naming_the_field(api):
    response = api.post(SUBMIT_FORM, {"prompt": "p", "height": "abc"})
    assert response.status_code == 400 and "height" in response.json()
