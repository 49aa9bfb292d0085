"""Where a run writes its video and poster (``storage.output_files``): in place on the filesystem
store, through a scratch folder and an upload elsewhere; an exception leaves nothing behind."""
import os
import uuid

import pytest

from tasks_app import storage


def _outputs_store(settings, backend: str, **options) -> None:
    settings.STORAGES = {**settings.STORAGES, "outputs": {"BACKEND": backend, "OPTIONS": options}}


@pytest.fixture
def filesystem_outputs(settings, tmp_path):
    _outputs_store(settings, "django.core.files.storage.FileSystemStorage", location=str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def test_on_the_filesystem_outputs_are_written_in_place_and_not_copied(filesystem_outputs):
    task_id = uuid.uuid4()
    with storage.output_files(task_id) as output:
        assert output.video == filesystem_outputs / "videos" / f"{task_id}.mp4"
        output.video.write_bytes(b"mp4")
        output.poster.write_bytes(b"jpg")
        inode_before = os.stat(output.video).st_ino
        published = output.publish()
    assert published == (f"outputs/videos/{task_id}.mp4", f"outputs/videos/{task_id}.jpg")
    assert [storage.resolve_public_path(path) for path in published] == [f"videos/{task_id}.mp4", f"videos/{task_id}.jpg"]
    assert os.stat(filesystem_outputs / "videos" / f"{task_id}.mp4").st_ino == inode_before  # the same file
    assert sorted(os.listdir(filesystem_outputs / "videos")) == sorted([f"{task_id}.mp4", f"{task_id}.jpg"])


def test_a_failed_run_leaves_no_output_on_the_filesystem(filesystem_outputs):
    task_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="encoder died"):
        with storage.output_files(task_id) as output:
            output.video.write_bytes(b"mp4")
            raise RuntimeError("encoder died")
    assert os.listdir(filesystem_outputs / "videos") == []


def test_other_stores_get_the_files_uploaded_from_a_scratch_folder(settings):
    _outputs_store(settings, "django.core.files.storage.InMemoryStorage")
    task_id = uuid.uuid4()
    with storage.output_files(task_id) as output:
        scratch = output.video.parent
        output.video.write_bytes(b"mp4")
        output.poster.write_bytes(b"jpg")
        assert not storage.outputs().exists(f"videos/{task_id}.mp4")  # nothing there before publish
        published = output.publish()
    assert published == (f"outputs/videos/{task_id}.mp4", f"outputs/videos/{task_id}.jpg")
    with storage.outputs().open(f"videos/{task_id}.mp4") as uploaded:
        assert uploaded.read() == b"mp4"
    assert not scratch.exists()
