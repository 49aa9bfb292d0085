"""Where a run writes its video and poster (``storage.output_files``): under names of its own beside
their public places on the filesystem store, in a scratch folder elsewhere; ``services.task_finish``
publishes them only while the run holds its task, so a run that lost it leaves a later run's files be."""
import os
import uuid

import pytest

from tasks_app import services, storage
from tasks_app.models import VideoTask


def _outputs_store(settings, backend: str, **options) -> None:
    settings.STORAGES = {**settings.STORAGES, "outputs": {"BACKEND": backend, "OPTIONS": options}}


@pytest.fixture
def filesystem_outputs(settings, tmp_path):
    _outputs_store(settings, "django.core.files.storage.FileSystemStorage", location=str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def _write(output: storage.OutputFiles, content: bytes) -> None:
    output.video.write_bytes(b"mp4 " + content)
    output.poster.write_bytes(b"jpg " + content)


def test_on_the_filesystem_outputs_are_published_by_a_rename_not_a_copy(filesystem_outputs):
    task_id = uuid.uuid4()
    with storage.output_files(task_id, attempt=1) as output:
        assert output.video.parent == filesystem_outputs / "videos"
        _write(output, b"one")
        inode_before = os.stat(output.video).st_ino
        output.publish()
        output.publish()  # a repeat (after a commit that failed) finds the files moved already
    assert (output.video_path, output.poster_path) == (f"outputs/videos/{task_id}.mp4", f"outputs/videos/{task_id}.jpg")
    assert storage.resolve_public_path(output.video_path) == f"videos/{task_id}.mp4"
    assert os.stat(filesystem_outputs / "videos" / f"{task_id}.mp4").st_ino == inode_before  # the same file
    assert sorted(os.listdir(filesystem_outputs / "videos")) == sorted([f"{task_id}.mp4", f"{task_id}.jpg"])


def test_a_failed_run_leaves_no_output_on_the_filesystem(filesystem_outputs):
    task_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="encoder died"):
        with storage.output_files(task_id, attempt=1) as output:
            _write(output, b"one")
            raise RuntimeError("encoder died")
    assert os.listdir(filesystem_outputs / "videos") == []


def test_other_stores_get_the_files_uploaded_from_a_scratch_folder(settings):
    _outputs_store(settings, "django.core.files.storage.InMemoryStorage")
    task_id = uuid.uuid4()
    with storage.output_files(task_id, attempt=1) as output:
        scratch = output.video.parent
        _write(output, b"one")
        assert not storage.outputs().exists(f"videos/{task_id}.mp4")  # nothing there before publish
        output.publish()
    with storage.outputs().open(f"videos/{task_id}.mp4") as uploaded:
        assert uploaded.read() == b"mp4 one"
    assert not scratch.exists()


@pytest.mark.parametrize("store", ["filesystem", "in-memory"])
def test_a_run_that_lost_its_task_while_encoding_leaves_the_later_runs_files(api, settings, tmp_path, store):
    if store == "filesystem":
        _outputs_store(settings, "django.core.files.storage.FileSystemStorage", location=str(tmp_path / "outputs"))
    else:
        _outputs_store(settings, "django.core.files.storage.InMemoryStorage")
    response = api.post("/v1/tasks/video", {"prompt": "twice", "height": 64, "width": 64}, format="json")
    stale = services.task_claim_next(worker_name="host:1")
    services.task_reap_stale(lease_s=-1, max_attempts=3)  # its heartbeats stopped: the task is queued again
    current = services.task_claim_next(worker_name="host:2")
    assert (stale.pk, stale.attempt_count, current.attempt_count) == (current.pk, 1, 2)

    with pytest.raises(services.TaskNoLongerRunning):
        with storage.output_files(stale.pk, stale.attempt_count) as stale_output:
            _write(stale_output, b"stale")  # still encoding while the second run works
            with storage.output_files(current.pk, current.attempt_count) as output:
                _write(output, b"current")
                assert services.task_finish(
                    task=current, file_path=output.video_path, poster_path=output.poster_path, video_info={},
                    run_stats={}, publish=output.publish,
                )  # fmt: skip
            # The stale run's finish finds the task gone, so its publish never runs; its files go.
            if not services.task_finish(
                task=stale, file_path=stale_output.video_path, poster_path=stale_output.poster_path,
                video_info={}, run_stats={}, publish=stale_output.publish,
            ):  # fmt: skip
                raise services.TaskNoLongerRunning(str(stale.pk))

    task = VideoTask.objects.get(pk=response.json()["task_id"])
    assert task.status == "succeed" and task.file_path == f"outputs/videos/{task.pk}.mp4"
    download = api.get(f"/v1/files/download/{task.file_path}")
    assert download.status_code == 200 and b"".join(download.streaming_content) == b"mp4 current"
    if store == "filesystem":
        assert sorted(os.listdir(tmp_path / "outputs" / "videos")) == sorted([f"{task.pk}.mp4", f"{task.pk}.jpg"])


def test_a_publish_that_fails_commits_nothing_and_leaves_nothing_public(api, filesystem_outputs):
    api.post("/v1/tasks/video", {"prompt": "no poster", "height": 64, "width": 64}, format="json")
    run = services.task_claim_next(worker_name="host:1")
    with pytest.raises(FileNotFoundError):
        with storage.output_files(run.pk, run.attempt_count) as output:
            output.video.write_bytes(b"mp4")  # the poster was never written
            services.task_finish(
                task=run, file_path=output.video_path, poster_path=output.poster_path, video_info={}, run_stats={},
                publish=output.publish,
            )  # fmt: skip
    assert VideoTask.objects.get(pk=run.pk).status == "running"  # the worker then records the failure
    assert os.listdir(filesystem_outputs / "videos") == []


def test_reaping_a_dead_run_removes_what_it_left_unpublished(api, filesystem_outputs):
    api.post("/v1/tasks/video", {"prompt": "worker dies", "height": 64, "width": 64}, format="json")
    dead = services.task_claim_next(worker_name="host:1")
    with storage.output_files(dead.pk, dead.attempt_count) as output:
        _write(output, b"dead")
        (output.video.parent / f".{output.video.name}.x1y2.part").write_bytes(b"half")  # an encoder's temp file
        (output.video.parent / "someone-else.mp4").write_bytes(b"keep")
    # The worker died here: nothing published, its files left behind.
    assert [task.pk for task in services.task_reap_stale(lease_s=-1, max_attempts=3)] == [dead.pk]
    assert os.listdir(filesystem_outputs / "videos") == ["someone-else.mp4"]


def _age(folder, seconds: float) -> None:
    for path in folder.iterdir():
        os.utime(path, (path.stat().st_atime - seconds, path.stat().st_mtime - seconds))


def test_files_of_a_run_whose_worker_died_before_a_cancel_are_swept(api, filesystem_outputs, settings):
    """The reaper only takes back running tasks: a task cancelled after its worker died is not one, so
    a worker's periodic sweep removes what that run left. Files of runs still holding their task stay."""
    from tasks_app import worker_process

    settings.LIGHTX2V_LEASE_S = 60
    for prompt in ("worker dies, then cancel", "still running"):
        api.post("/v1/tasks/video", {"prompt": prompt, "height": 64, "width": 64}, format="json")
    dead, alive = (services.task_claim_next(worker_name=f"host:{n}") for n in (1, 2))
    for run in (dead, alive):
        with storage.output_files(run.pk, run.attempt_count) as output:
            _write(output, b"unpublished")
            (output.video.parent / f".{output.video.name}.x1y2.part").write_bytes(b"half")
    (filesystem_outputs / "videos" / "someone-else.mp4").write_bytes(b"keep")
    assert api.delete(f"/v1/tasks/{dead.pk}").json()["status"] == "cancelled"

    assert worker_process.sweep_stray_run_files() == 0  # written under a lease ago: maybe still being written
    _age(filesystem_outputs / "videos", seconds=120)
    assert worker_process.sweep_stray_run_files() == 1

    alive_files = [f".{alive.pk}.attempt-1.mp4", f".{alive.pk}.attempt-1.jpg", f"..{alive.pk}.attempt-1.mp4.x1y2.part"]
    assert sorted(os.listdir(filesystem_outputs / "videos")) == sorted(["someone-else.mp4", *alive_files])


def test_files_of_tasks_finished_past_the_retention_period_are_removed(api, filesystem_outputs, settings, tmp_path):
    """Video, poster and input image go; the row stays, its result is 410 and an I2V retry is refused."""
    from datetime import timedelta

    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.utils import timezone

    from tasks_app import retention, worker_process
    from tasks_app.errors import TaskNotRetryable
    from tests.conftest import png_bytes

    settings.LIGHTX2V_UPLOAD_ROOT = tmp_path / "uploads"
    settings.STORAGES = {**settings.STORAGES, "uploads": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "uploads")}}}
    upload = SimpleUploadedFile("in.png", png_bytes(32, 32), content_type="image/png")
    old, recent = (api.post("/v1/tasks/video/form", {"prompt": prompt, "image_file": upload if n == 0 else ""}).json()
                   ["task_id"] for n, prompt in enumerate(("old", "recent")))  # fmt: skip
    for task_id, days_ago in ((old, 31), (recent, 29)):
        with storage.output_files(uuid.UUID(task_id), attempt=1) as output:
            _write(output, b"done")
            output.publish()
        VideoTask.objects.filter(pk=task_id).update(
            status="succeed", file_path=output.video_path, poster_path=output.poster_path,
            finished_at=timezone.now() - timedelta(days=days_ago),
        )  # fmt: skip
    settings.LIGHTX2V_RETENTION_DAYS = 0
    worker_process._beat()
    assert len(os.listdir(filesystem_outputs / "videos")) == 4  # 0 days: kept forever

    settings.LIGHTX2V_RETENTION_DAYS = 30
    worker_process._next_sweep_at = 0.0
    worker_process._beat()

    assert sorted(os.listdir(filesystem_outputs / "videos")) == [f"{recent}.jpg", f"{recent}.mp4"]
    assert os.listdir(tmp_path / "uploads") == []
    expired = api.get(f"/v1/tasks/{old}/status").json()
    assert (expired["status"], expired["message"], expired["file_path"]) == ("succeed", retention.EXPIRED_MESSAGE, "")
    assert api.get(f"/v1/tasks/{old}/result").status_code == 410
    assert api.get(f"/v1/tasks/{recent}/result").status_code == 200
    VideoTask.objects.filter(pk=old).update(status="failed")
    with pytest.raises(TaskNotRetryable, match="input image was removed"):  # it would run as T2V
        services.task_retry(task=VideoTask.objects.get(pk=old))
