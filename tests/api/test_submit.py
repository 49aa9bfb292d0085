"""Submitting tasks: defaults, recorded seed, I2V inputs (bad input: test_bad_requests.py)."""
import base64
import io
import os

from PIL import Image

from inference.options import InferenceOptions
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


def test_step_cache_is_the_servers_unless_the_request_names_one(api, settings):
    def submitted_cache(body: dict, path: str = SUBMIT, format: str = "json") -> str:
        response = api.post(path, {"prompt": "p", **body}, format=format)
        assert response.status_code == 201, response.json()
        task_id = response.json()["task_id"]
        stored = VideoTask.objects.get(task_id=task_id).step_cache
        assert api.get(f"/v1/tasks/{task_id}/status").json()["step_cache"] == stored
        return stored

    assert submitted_cache({}) == submitted_cache({"step_cache": None}) == "none"
    assert submitted_cache({"step_cache": "taylorseer"}) == "taylorseer"
    assert submitted_cache({"step_cache": "first_block"}, SUBMIT_FORM, "multipart") == "first_block"
    settings.LIGHTX2V_INFERENCE_OPTIONS = InferenceOptions(cache="first_block")
    assert submitted_cache({}) == submitted_cache({"step_cache": ""}, SUBMIT_FORM, "multipart") == "first_block"
    assert submitted_cache({"step_cache": "none"}) == "none"
    metadata = api.get("/v1/service/metadata").json()["step_caches"]
    assert metadata == {"available": ["none", "first_block", "taylorseer"], "default": "first_block"}


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


def test_data_url_image_makes_an_i2v_task_and_is_recorded_by_its_header(api, settings):
    """A data URL of any accepted size is stored as an image; the task records only its header."""
    noisy = Image.frombytes("RGB", (96, 96), os.urandom(96 * 96 * 3))
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(data_url) > 20_000

    response = api.post(SUBMIT, {"prompt": "p", "image_path": data_url}, format="json")

    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    assert task.task_type == "i2v" and task.image_path == "data:image/png;base64,"
    stored = Image.open(settings.LIGHTX2V_UPLOAD_ROOT / task.input_image)
    assert stored.tobytes() == noisy.tobytes()
    assert api.get(f"/v1/tasks/{task.task_id}/status").json()["image_path"] == "data:image/png;base64,"


def test_escaped_surrogate_pairs_are_text_like_any_other(api):
    """JSON may spell characters outside the BMP as \\uD83D\\uDE00 pairs; only lone halves are refused."""
    body = '{"prompt": "a cat \\ud83d\\ude00", "note": "\\ud83c\\udf89"}'
    response = api.post(SUBMIT, data=body, content_type="application/json")
    assert response.status_code == 201, response.json()
    assert VideoTask.objects.get(task_id=response.json()["task_id"]).prompt == "a cat \U0001f600"


def test_multipart_upload_makes_an_i2v_task_stored_under_a_server_name(api, settings):
    upload = _upload("../../evil name.png", png_bytes())
    response = api.post(SUBMIT_FORM, {"prompt": "p", "height": "64", "width": "64", "image_file": upload})

    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    # resize_mode adaptive (the default): the 40x24 image's 5:3 shape at no more than 64x64 pixels.
    assert task.task_type == "i2v" and (task.height, task.width) == (48, 80)
    assert (settings.LIGHTX2V_UPLOAD_ROOT / f"{task.task_id}.png").is_file()


def test_a_large_photo_is_stored_with_its_short_side_at_the_largest_video_side(api, settings):
    """Every video size still covers it without upscaling; the stored PNG is not the 36 MP original."""
    big = Image.new("RGB", (6000, 4000), (10, 200, 30))
    raw = io.BytesIO()
    big.save(raw, format="JPEG", quality=80)
    response = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": _upload("big.jpg", raw.getvalue(), "image/jpeg"),
                                      "resize_mode": "adaptive"})  # fmt: skip
    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    stored = Image.open(settings.LIGHTX2V_UPLOAD_ROOT / task.input_image)
    assert stored.size == (1920, 1280)
    assert (task.height, task.width) == (512, 768)  # adaptive: 3:2 at 480x832's area, as for the original


def test_camera_jpegs_are_accepted_upright(api, settings):
    """Phone photos: MPO (a JPEG with a depth frame, as Pillow names it) and EXIF orientation (applied)."""
    left_half_red = Image.new("RGB", (40, 24), (0, 0, 255))
    left_half_red.paste((255, 0, 0), (0, 0, 20, 24))
    mpo = io.BytesIO()
    left_half_red.save(mpo, format="MPO", save_all=True, append_images=[Image.new("RGB", (40, 24))])
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise to view
    left_half_red.save(rotated, format="JPEG", exif=exif, quality=95)

    stored = {}
    for name, raw in (("mpo", mpo.getvalue()), ("rotated", rotated.getvalue())):
        response = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": _upload(f"{name}.jpg", raw, "image/jpeg")})
        assert response.status_code == 201, response.json()
        task = VideoTask.objects.get(task_id=response.json()["task_id"])
        stored[name] = Image.open(settings.LIGHTX2V_UPLOAD_ROOT / task.input_image).convert("RGB")

    assert stored["mpo"].size == (40, 24) and stored["mpo"].getpixel((5, 12))[0] > 200  # the first frame
    # Turned clockwise, the red left half is the top half of a 24x40 portrait.
    assert stored["rotated"].size == (24, 40)
    assert stored["rotated"].getpixel((12, 5))[0] > 200 and stored["rotated"].getpixel((12, 35))[2] > 200


def test_multipart_without_image_is_t2v(api):
    response = api.post(SUBMIT_FORM, {"prompt": "p"})
    assert response.status_code == 201
    assert VideoTask.objects.get(task_id=response.json()["task_id"]).task_type == "t2v"


def test_a_browser_form_with_no_file_chosen_is_t2v_and_a_utf8_filename_is_i2v(api):
    """Browsers send an unchosen file input as an empty part with ``filename=""``; RFC 7578 filenames are UTF-8."""
    png = png_bytes(32, 32)
    for params, content, task_type in [(b'; filename=""', b"", "t2v"), ('; filename="café.png"'.encode(), png, "i2v")]:
        body = (
            b'--B0\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n--B0\r\nContent-Disposition: '
            b'form-data; name="image_file"' + params + b"\r\nContent-Type: application/octet-stream\r\n\r\n"
            + content + b"\r\n--B0--\r\n"
        )  # fmt: skip
        response = api.generic("POST", SUBMIT_FORM, body, content_type="multipart/form-data; boundary=B0")
        assert response.status_code == 201, response.content
        assert VideoTask.objects.get(task_id=response.json()["task_id"]).task_type == task_type


def _upload(name: str, content: bytes, content_type: str = "image/png"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content, content_type=content_type)


def test_fixed_shape_keeps_the_requested_size_for_i2v(api):
    upload = _upload("wide.png", png_bytes(40, 24))
    body = {"prompt": "p", "height": "64", "width": "64", "resize_mode": "fixed_shape", "image_file": upload}
    response = api.post(SUBMIT_FORM, body)
    assert response.status_code == 201, response.json()
    task = VideoTask.objects.get(task_id=response.json()["task_id"])
    assert (task.height, task.width, task.resize_mode) == (64, 64, "fixed_shape")


def test_new_generation_fields_are_stored_and_reported(api):
    body = {"prompt": "p", "lora_name": "alpha", "lora_strength": 0.5, "sample_shift": 3.0}
    task_id = api.post(SUBMIT, body, format="json").json()["task_id"]

    status = api.get(f"/v1/tasks/{task_id}/status").json()

    assert (status["lora_name"], status["lora_strength"], status["sample_shift"]) == ("alpha", 0.5, 3.0)
    default = api.post(SUBMIT, {"prompt": "p"}, format="json").json()["task_id"]
    assert api.get(f"/v1/tasks/{default}/status").json()["sample_shift"] == 5.0  # distilled default
    assert set(api.get("/v1/service/metadata").json()["loras"]) >= {"alpha", "beta"}


def test_without_an_i2v_model_an_image_is_refused_naming_the_field_that_brought_it(api, settings):
    settings.LIGHTX2V_I2V_MODEL_PATH = ""
    upload = api.post(SUBMIT_FORM, {"prompt": "p", "image_file": _upload("cat.png", png_bytes())})
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    inline = api.post(SUBMIT, {"prompt": "p", "image_path": data_url}, format="json")
    fragments = api.post(SUBMIT, {"prompt": "p", "num_fragments": 2}, format="json")

    assert (upload.status_code, list(upload.json())) == (400, ["image_file"])
    assert (inline.status_code, list(inline.json())) == (400, ["image_path"])
    assert (fragments.status_code, list(fragments.json())) == (400, ["num_fragments"])
