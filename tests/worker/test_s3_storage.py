"""The whole flow with S3-compatible storage (a local moto server): uploads, outputs, downloads with Range."""
import socket

import boto3
import pytest
from moto.server import ThreadedMotoServer

from inference.encode import probe_mp4
from lightx2v_site.storages import build_storages
from tests.conftest import png_bytes
from tests.worker.conftest import submit

pytestmark = pytest.mark.worker

BUCKET = "lightx2v-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
TINY = {"height": 64, "width": 64, "video_duration": 1, "infer_steps": 2}


@pytest.fixture
def s3_endpoint(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_settings(settings, s3_endpoint):
    """The live server's storages on the bucket (the workers get the same through their environment)."""
    settings.STORAGES = {
        **settings.STORAGES,
        **build_storages("s3", output_root=None, upload_root=None, bucket=BUCKET, endpoint_url=s3_endpoint),
    }
    return {"LIGHTX2V_STORAGE": "s3", "LIGHTX2V_S3_BUCKET": BUCKET, "LIGHTX2V_S3_ENDPOINT_URL": s3_endpoint, **CREDENTIALS}


def test_tasks_store_inputs_and_outputs_in_s3_and_download_with_ranges(workers, http, s3_settings, tmp_path):
    workers.start(extra_env={**s3_settings, "LIGHTX2V_OUTPUT_ROOT": str(tmp_path / "unused-outputs")})
    t2v_id = submit(http, {"prompt": "a bucket of paint", **TINY})
    response = http.post(
        "/v1/tasks/video/form",
        data={"prompt": "it spills", **{key: str(value) for key, value in TINY.items()}},
        files={"image_file": ("in.png", png_bytes(64, 64), "image/png")},
    )
    assert response.status_code == 201, response.text
    i2v_id = response.json()["task_id"]

    for task_id in (t2v_id, i2v_id):
        final, _ = http.poll_until_finished(task_id)
        assert final["status"] == "succeed", final["message"]
        whole = http.get(f"/v1/tasks/{task_id}/result")
        download = http.get(f"/v1/files/download/{final['file_path']}")
        assert whole.status_code == download.status_code == 200 and whole.content == download.content
        assert whole.headers["Accept-Ranges"] == "bytes"
        part = http.get(f"/v1/files/download/{final['file_path']}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole.content[100:200]
        assert part.headers["Content-Range"] == f"bytes 100-199/{len(whole.content)}"
        video = tmp_path / f"{task_id}.mp4"
        video.write_bytes(whole.content)
        assert probe_mp4(video)["frames"] == 17

    keys = {item["Key"] for item in boto3.client("s3", endpoint_url=s3_settings["LIGHTX2V_S3_ENDPOINT_URL"])
            .list_objects_v2(Bucket=BUCKET)["Contents"]}  # fmt: skip
    assert {f"outputs/videos/{t2v_id}.mp4", f"outputs/videos/{i2v_id}.jpg", f"uploads/{i2v_id}.png"} <= keys
    assert not (tmp_path / "unused-outputs").exists()  # nothing was written to the local output folder
