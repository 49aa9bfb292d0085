"""A corpus of bad requests: each gets the expected 4xx with JSON naming the problem, creates no task,
and opens no file outside the allowed folders (watched with an audit hook on ``open``)."""
import base64
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from tasks_app.models import VideoTask
from tests.conftest import png_bytes

SUBMIT = "/v1/tasks/video"
SUBMIT_FORM = "/v1/tasks/video/form"
SECRET_NAME = "secret.png"  # a valid PNG planted beside the allowed folders: it must never be opened

_opened_paths: list[str] = []


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened_paths.append(str(args[0]))


sys.addaudithook(_record_open)  # audit hooks cannot be removed; it only appends to a list


@dataclass(frozen=True)
class Bad:
    """One bad request: ``send`` is json | raw | form | get | delete; ``names`` must appear in the body."""

    name: str
    send: str
    payload: object
    status: int
    names: str
    content_type: str = ""
    files: dict = field(default_factory=dict)


def _data_url(raw: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64," + base64.b64encode(raw).decode()


def _image(fmt: str, size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """48 megapixels of one grey: a few kB on the wire, more than the 40 MP limit when decoded."""
    return _image("PNG", size=(8000, 6000), mode="L")


def _multipart(disposition_params: bytes, name: bytes = b'name="image_file"') -> bytes:
    """A form with a prompt and a real PNG in an ``image_file`` part with the given disposition parameters."""
    return (
        b'--B0\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n'
        b"--B0\r\nContent-Disposition: form-data; " + name + disposition_params
        + b"\r\nContent-Type: image/png\r\n\r\n" + png_bytes(32, 32) + b"\r\n--B0--\r\n"
    )  # fmt: skip


MULTIPART = "multipart/form-data; boundary=B0"
TRUNCATED_PNG = png_bytes(64, 64)[:60]
OK = {"prompt": "p"}

CORPUS = [
    # --- JSON fields: types, bounds, missing -----------------------------------------------------
    Bad("missing prompt", "json", {}, 400, "prompt"),
    Bad("empty prompt", "json", {"prompt": ""}, 400, "prompt"),
    Bad("blank prompt", "json", {"prompt": " \t\n "}, 400, "prompt"),
    Bad("prompt too long", "json", {"prompt": "x" * 2001}, 400, "prompt"),
    Bad("prompt is an object", "json", {"prompt": {"text": "p"}}, 400, "prompt"),
    Bad("prompt is null", "json", {"prompt": None}, 400, "prompt"),
    Bad("prompt is a number", "json", {"prompt": 5}, 400, "prompt"),
    Bad("prompt is a boolean", "json", {"prompt": True}, 400, "prompt"),
    Bad("prompt overflows to inf", "raw", '{"prompt": 1e400}', 400, "prompt", content_type="application/json"),
    Bad("negative prompt is a number", "json", {**OK, "negative_prompt": 0}, 400, "negative_prompt"),
    Bad("image_path is a number", "json", {**OK, "image_path": 1}, 400, "image_path"),
    Bad("lora_name is a number", "json", {**OK, "lora_name": 1.5}, 400, "lora_name"),
    Bad("callback_url is a number", "json", {**OK, "callback_url": 80}, 400, "callback_url"),
    Bad("negative prompt too long", "json", {**OK, "negative_prompt": "x" * 2001}, 400, "negative_prompt"),
    Bad("infer_steps 0", "json", {**OK, "infer_steps": 0}, 400, "infer_steps"),
    Bad("infer_steps 51", "json", {**OK, "infer_steps": 51}, 400, "infer_steps"),
    Bad("infer_steps word", "json", {**OK, "infer_steps": "four"}, 400, "infer_steps"),
    Bad("infer_steps fraction", "json", {**OK, "infer_steps": 2.5}, 400, "infer_steps"),
    Bad("infer_steps boolean", "json", {**OK, "infer_steps": True}, 400, "infer_steps"),
    Bad("infer_steps list", "json", {**OK, "infer_steps": [4]}, 400, "infer_steps"),
    Bad("duration 0", "json", {**OK, "video_duration": 0}, 400, "video_duration"),
    Bad("duration over max", "json", {**OK, "video_duration": 11}, 400, "video_duration"),
    Bad("duration negative", "json", {**OK, "video_duration": -5}, 400, "video_duration"),
    Bad("seed negative", "json", {**OK, "seed": -1}, 400, "seed"),
    Bad("seed 2^32", "json", {**OK, "seed": 2**32}, 400, "seed"),
    Bad("seed huge", "json", {**OK, "seed": 10**40}, 400, "seed"),
    Bad("height not multiple of 16", "json", {**OK, "height": 470}, 400, "height"),
    Bad("height 0", "json", {**OK, "height": 0}, 400, "height"),
    Bad("width over 1280", "json", {**OK, "width": 1296}, 400, "width"),
    Bad("width under 16", "json", {**OK, "width": 8}, 400, "width"),
    Bad("width as text", "json", {**OK, "width": "wide"}, 400, "width"),
    Bad("too many pixels", "json", {**OK, "height": 1280, "width": 1280}, 400, "height"),
    Bad("fragments 0", "json", {**OK, "num_fragments": 0}, 400, "num_fragments"),
    Bad("fragments 9", "json", {**OK, "num_fragments": 9}, 400, "num_fragments"),
    Bad("guidance below 1", "json", {**OK, "guidance_scale": 0.5}, 400, "guidance_scale"),
    Bad("guidance NaN", "json", {**OK, "guidance_scale": "NaN"}, 400, "guidance_scale"),
    Bad("guidance infinite", "json", {**OK, "guidance_scale": "Infinity"}, 400, "guidance_scale"),
    Bad("guidance over 20", "json", {**OK, "guidance_scale": 21}, 400, "guidance_scale"),
    Bad("unknown LoRA", "json", {**OK, "lora_name": "gamma"}, 400, "lora_name"),
    Bad("LoRA traversal", "json", {**OK, "lora_name": "../secret/secret"}, 400, "lora_name"),
    Bad("LoRA strength over 2", "json", {**OK, "lora_name": "alpha", "lora_strength": 2.5}, 400, "lora_strength"),
    Bad("LoRA strength negative", "json", {**OK, "lora_strength": -0.1}, 400, "lora_strength"),
    Bad("sample_shift zero", "json", {**OK, "sample_shift": 0}, 400, "sample_shift"),
    Bad("sample_shift text", "json", {**OK, "sample_shift": "high"}, 400, "sample_shift"),
    Bad("resize_mode unknown", "json", {**OK, "resize_mode": "stretch"}, 400, "resize_mode"),
    Bad("step_cache unknown", "json", {**OK, "step_cache": "teacache"}, 400, "step_cache"),
    Bad("step_cache not a string", "json", {**OK, "step_cache": 1}, 400, "step_cache"),
    Bad("callback to loopback", "json", {**OK, "callback_url": "http://127.0.0.1:9/hook"}, 400, "callback_url"),
    Bad("callback to localhost", "json", {**OK, "callback_url": "http://localhost/hook"}, 400, "callback_url"),
    Bad("callback to metadata IP", "json", {**OK, "callback_url": "http://169.254.169.254/"}, 400, "callback_url"),
    Bad("callback to NAT64 of a private address", "json", {**OK, "callback_url": "http://[64:ff9b::a00:1]/"}, 400,
        "callback_url"),  # fmt: skip
    Bad("callback to 6to4 of a private address", "json", {**OK, "callback_url": "http://[2002:a00:1::1]/"}, 400,
        "callback_url"),  # fmt: skip
    Bad("callback to IPv4-compatible loopback", "json", {**OK, "callback_url": "http://[::127.0.0.1]/"}, 400,
        "callback_url"),  # fmt: skip
    Bad("callback to site-local IPv6", "json", {**OK, "callback_url": "http://[fec0::1]/"}, 400, "callback_url"),
    Bad("callback to private net", "json", {**OK, "callback_url": "https://10.0.0.8/hook"}, 400, "callback_url"),
    Bad("callback port out of range", "json", {**OK, "callback_url": "http://example.com:99999/x"}, 400, "callback_url"),
    Bad("callback not http", "json", {**OK, "callback_url": "ftp://example.com/x"}, 400, "callback_url"),
    # --- image_path: traversal in every spelling, URLs, fake images -------------------------------
    Bad("image_path absolute secret", "json", {**OK, "image_path": "{secret}"}, 400, "image_path"),
    Bad("image_path dot-dot", "json", {**OK, "image_path": "../secret/" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path deep dot-dot", "json", {**OK, "image_path": "a/b/../../../secret/" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path etc passwd", "json", {**OK, "image_path": "/etc/passwd"}, 400, "image_path"),
    Bad("image_path many dot-dots", "json", {**OK, "image_path": "../../../../../../etc/passwd"}, 400, "image_path"),
    Bad("image_path url-encoded", "json", {**OK, "image_path": "..%2fsecret%2f" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path double-encoded", "json", {**OK, "image_path": "%252e%252e%252fsecret"}, 400, "image_path"),
    Bad("image_path backslashes", "json", {**OK, "image_path": "..\\secret\\" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path overlong utf-8", "json", {**OK, "image_path": "%c0%ae%c0%ae/secret/" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path NUL byte", "json", {**OK, "image_path": "in.png\x00../secret"}, 400, "image_path"),
    Bad("image_path home", "json", {**OK, "image_path": "~/" + SECRET_NAME}, 400, "image_path"),
    Bad("image_path symlink out", "json", {**OK, "image_path": "link-out.png"}, 400, "image_path"),
    Bad("image_path missing file", "json", {**OK, "image_path": "missing.png"}, 400, "image_path"),
    Bad("image_path a folder", "json", {**OK, "image_path": "."}, 400, "image_path"),
    Bad("image_path text file", "json", {**OK, "image_path": "notes.png"}, 400, "image_path"),
    Bad("image_path http URL (SSRF)", "json", {**OK, "image_path": "http://169.254.169.254/latest/"}, 400, "image_path"),
    Bad("image_path file URL", "json", {**OK, "image_path": "file://{secret}"}, 400, "image_path"),
    Bad("image_path longer than a path", "json", {**OK, "image_path": "a/" * 3000 + "in.png"}, 400, "image_path"),
    Bad("data URL bad base64", "json", {**OK, "image_path": "data:image/png;base64,not-base64!!"}, 400, "image_path"),
    Bad("data URL not an image", "json", {**OK, "image_path": _data_url(b"not an image")}, 400, "image_path"),
    Bad("data URL text type", "json", {**OK, "image_path": "data:text/plain;base64,aGVsbG8="}, 400, "image_path"),
    Bad("data URL GIF", "json", {**OK, "image_path": _data_url(_image("GIF"), "gif")}, 400, "image_path"),
    Bad("data URL truncated PNG", "json", {**OK, "image_path": _data_url(TRUNCATED_PNG)}, 400, "image_path"),
    # --- bodies and content types ----------------------------------------------------------------
    Bad("malformed JSON", "raw", '{"prompt": "p",', 400, "detail", content_type="application/json"),
    Bad("JSON list body", "raw", '["prompt"]', 400, "non_field_errors", content_type="application/json"),
    Bad("JSON string body", "raw", '"p"', 400, "non_field_errors", content_type="application/json"),
    Bad("JSON invalid UTF-8", "raw", b'{"prompt": "\xff\xfe"}', 400, "detail", content_type="application/json"),
    Bad("JSON lone surrogate in prompt", "raw", '{"prompt": "a\\ud800b"}', 400, "detail", content_type="application/json"),
    Bad(
        "JSON lone surrogate in an unknown field", "raw", '{"prompt": "p", "note": ["\\udfff"]}', 400, "detail",
        content_type="application/json",
    ),
    Bad("JSON nested past the recursion limit", "raw", '{"prompt": "p", "x": ' + "[" * 5000 + "]" * 5000 + "}", 400,
        "detail", content_type="application/json"),  # fmt: skip
    Bad("docs page asked for OPTIONS", "options", "/docs", 405, "detail"),
    Bad("JSON of many empty objects", "raw", '{"prompt": "p", "junk": [' + "{}," * 20_000 + "{}]}", 400,
        "detail", content_type="application/json"),  # fmt: skip
    Bad("JSON body over the cap", "raw", json.dumps({"prompt": "p", "pad": "x" * 300_000}), 413, "detail",
        content_type="application/json"),  # fmt: skip
    Bad("text/plain to JSON endpoint", "raw", "prompt=p", 415, "detail", content_type="text/plain"),
    Bad("JSON to multipart endpoint", "raw-form", '{"prompt": "p"}', 415, "detail", content_type="application/json"),
    Bad(
        "multipart without boundary", "raw-form", "--x\r\n", 400, "detail", content_type="multipart/form-data"
    ),
    Bad("form with too many fields", "form", {**OK, **{f"f{i}": "x" for i in range(120)}}, 400, "detail"),
    Bad(
        "urlencoded body over the cap", "raw-form", "prompt=p&pad=" + "x" * 300_000, 413, "detail",
        content_type="application/x-www-form-urlencoded",
    ),
    Bad("form number not a number", "form", {"prompt": "p", "height": "abc"}, 400, "height"),
    Bad("form missing prompt", "form", {"height": "64"}, 400, "prompt"),
    Bad("upload not an image", "form", OK, 400, "image_file", files={"image_file": ("x.png", b"GIF89a nonsense")}),
    Bad("upload GIF", "form", OK, 400, "image_file", files={"image_file": ("x.gif", _image("GIF"))}),
    Bad("upload truncated PNG", "form", OK, 400, "image_file", files={"image_file": ("x.png", TRUNCATED_PNG)}),
    Bad("upload with a Latin-1 filename Django drops", "raw-form", _multipart(b'; filename="caf\xe9.png"'), 400,
        "image_file", content_type=MULTIPART),  # fmt: skip
    Bad("upload named ..", "raw-form", _multipart(b'; filename=".."'), 400, "image_file", content_type=MULTIPART),
    Bad("upload named /", "raw-form", _multipart(b'; filename="/"'), 400, "image_file", content_type=MULTIPART),
    Bad("upload named .. in unquoted parameters", "raw-form", _multipart(b"; filename=..", b"name = image_file"), 400,
        "image_file", content_type=MULTIPART),  # fmt: skip
    Bad("upload empty", "form", OK, 400, "image_file", files={"image_file": ("x.png", b"")}),
    Bad("upload decompression bomb", "form", OK, 400, "image_file", files={"image_file": ("b.png", "BOMB")}),
    Bad("upload too large", "form", OK, 413, "image_file", files={"image_file": ("big.png", "BIG")}),
    Bad(
        "upload and image_path both", "form", {**OK, "image_path": "in.png"}, 400, "image_file",
        files={"image_file": ("x.png", "PNG")},
    ),
    # --- ids and downloads ------------------------------------------------------------------------
    Bad("list page 0", "get", "/v1/tasks?page=0", 400, "page"),
    Bad("list page a word", "get", "/v1/tasks?page=abc", 400, "page"),
    Bad("list page negative", "get", "/v1/tasks?page=-1", 400, "page"),
    Bad("list page a fraction", "get", "/v1/tasks?page=1.5", 400, "page"),
    Bad("list page in full-width digits", "get", "/v1/tasks?page=%EF%BC%92", 400, "page"),
    Bad("list page past the last", "get", "/v1/tasks?page=2", 404, "page"),
    Bad("list page of 5000 digits", "get", "/v1/tasks?page=" + "9" * 5000, 400, "page"),  # past int()'s limit
    Bad("status of a non-UUID id", "get", "/v1/tasks/not-a-uuid/status", 404, "detail"),
    Bad("status of an unknown id", "get", "/v1/tasks/00000000-0000-4000-8000-000000000000/status", 404, "detail"),
    Bad("result of a non-UUID id", "get", "/v1/tasks/1%27%20OR%201=1/result", 404, "detail"),
    Bad("cancel a non-UUID id", "delete", "/v1/tasks/..%2f..%2fetc/", 404, "detail"),
    Bad("download dot-dot", "get", "/v1/files/download/outputs/videos/../../" + SECRET_NAME, 404, "detail"),
    Bad("download root dot-dot", "get", "/v1/files/download/outputs/../" + SECRET_NAME, 404, "detail"),
    Bad("download encoded dots", "get", "/v1/files/download/outputs/%2e%2e/" + SECRET_NAME, 404, "detail"),
    Bad("download encoded slash", "get", "/v1/files/download/outputs/videos/..%2f..%2f" + SECRET_NAME, 404, "detail"),
    Bad("download double-encoded", "get", "/v1/files/download/outputs/%252e%252e%252f" + SECRET_NAME, 404, "detail"),
    Bad("download absolute", "get", "/v1/files/download//etc/passwd", 404, "detail"),
    Bad("download encoded absolute", "get", "/v1/files/download/%2fetc%2fpasswd", 404, "detail"),
    Bad("download backslashes", "get", "/v1/files/download/outputs\\..\\" + SECRET_NAME, 404, "detail"),
    Bad("download NUL", "get", "/v1/files/download/outputs/videos/x.mp4%00.png", 404, "detail"),
    Bad("download source file", "get", "/v1/files/download/manage.py", 404, "detail"),
    Bad("download settings", "get", "/v1/files/download/lightx2v_site/settings.py", 404, "detail"),
    Bad("download the output folder", "get", "/v1/files/download/outputs/videos/", 404, "detail"),
    Bad("download an unowned file", "get", "/v1/files/download/outputs/videos/planted.mp4", 404, "detail"),
    Bad("download symlink out", "get", "/v1/files/download/outputs/videos/link-out.mp4", 404, "detail"),
]

assert len(CORPUS) >= 40


@pytest.fixture
def sandbox(settings, tmp_path):
    """Allowed folders plus a planted secret beside them, and links pointing out at it."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "in.png").write_bytes(png_bytes())
    (inputs / "notes.png").write_bytes(b"plain text, not an image")
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    secret = secret_dir / SECRET_NAME
    secret.write_bytes(png_bytes())
    (inputs / "link-out.png").symlink_to(secret)
    settings.LIGHTX2V_INPUT_ROOTS = [inputs]
    settings.LIGHTX2V_MAX_UPLOAD_BYTES = 64 * 1024
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
    output_root = tmp_path / "outputs"
    videos = output_root / "videos"
    videos.mkdir(parents=True)
    (videos / "planted.mp4").write_bytes(b"not any task's video")
    (videos / "link-out.mp4").symlink_to(secret)
    (tmp_path / SECRET_NAME).write_bytes(png_bytes())  # what outputs/../secret.png would reach
    settings.LIGHTX2V_OUTPUT_ROOT = output_root
    return {"secret": secret, "watched": [str(secret_dir), str(tmp_path / SECRET_NAME), "/etc/passwd"]}


def _upload_content(marker):
    return {"BOMB": _bomb_png, "BIG": lambda: png_bytes(400, 400) + b"\0" * 70_000, "PNG": png_bytes}.get(
        marker, lambda: marker
    )()


def _send(api, bad: Bad, secret: Path):
    if bad.send == "json":
        body = json.loads(json.dumps(bad.payload).replace("{secret}", str(secret)))
        return api.post(SUBMIT, body, format="json")
    if bad.send in ("raw", "raw-form"):
        return api.post(SUBMIT if bad.send == "raw" else SUBMIT_FORM, data=bad.payload, content_type=bad.content_type)
    if bad.send == "form":
        from django.core.files.uploadedfile import SimpleUploadedFile

        files = {
            name: SimpleUploadedFile(filename, _upload_content(content), content_type="image/png")
            for name, (filename, content) in bad.files.items()
        }
        return api.post(SUBMIT_FORM, {**bad.payload, **files})
    return getattr(api, bad.send)(bad.payload)


@pytest.mark.parametrize("bad", CORPUS, ids=[bad.name for bad in CORPUS])
def test_bad_request_is_refused_with_json_naming_the_problem(api, sandbox, bad):
    _opened_paths.clear()

    response = _send(api, bad, sandbox["secret"])

    assert response.status_code == bad.status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    assert bad.names in json.dumps(response.json())
    assert not VideoTask.objects.exists()
    leaked = [path for path in _opened_paths if any(path.startswith(watched) for watched in sandbox["watched"])]
    assert leaked == []


def test_the_watcher_does_see_a_permitted_open(api, sandbox):
    """The audit hook is live: an accepted image_path shows up among the opened files."""
    _opened_paths.clear()
    assert api.post(SUBMIT, {**OK, "image_path": "in.png"}, format="json").status_code == 201
    assert any(path.endswith("in.png") for path in _opened_paths)


def test_unknown_fields_are_ignored(api):
    """Documented rule: fields the API does not know (e.g. LightX2V's use_prompt_enhancer) are ignored."""
    response = api.post(SUBMIT, {**OK, "use_prompt_enhancer": True, "target_fps": 24}, format="json")
    assert response.status_code == 201
    # Whatever text they hold: an unpaired surrogate that came in another charset (the UTF-8 spelling
    # of one is refused by the parser) is ignored too, and so is its idempotency fingerprint's.
    utf16 = '{"prompt": "p", "x": "\\ud800"}'.encode("utf-16-le")
    response = api.post(SUBMIT, data=utf16, content_type="application/json; charset=utf-16le")
    assert response.status_code == 201, response.content
    response = api.post(SUBMIT_FORM, data="prompt=p&x=%2B2AA-", content_type="application/x-www-form-urlencoded; charset=utf-7")
    assert response.status_code == 201, response.content
