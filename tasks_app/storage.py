"""Where files live: through Django's storage API, ``storages["outputs"]`` and ``storages["uploads"]``.

The local filesystem by default, an S3-compatible bucket with one setting (lightx2v_site/storages.py).
Clients only ever see *public* paths such as ``outputs/videos/<task_id>.mp4``; this module maps them
to storage names (``videos/<task_id>.mp4``) and refuses anything malformed. On the filesystem it also
refuses symlinks and anything that resolves outside the output folder.
"""
import contextlib
import io
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, storages
from PIL import Image

PUBLIC_OUTPUT_PREFIX = "outputs"
VIDEO_FOLDER = "videos"


def outputs():
    return storages["outputs"]


def uploads():
    return storages["uploads"]


def video_public_path(task_id: uuid.UUID, suffix: str = ".mp4") -> str:
    """The client-facing path of a task's video (or its ``.jpg`` poster), e.g. ``outputs/videos/<task_id>.mp4``."""
    return f"{PUBLIC_OUTPUT_PREFIX}/{_video_name(task_id, suffix)}"


def _video_name(task_id: uuid.UUID, suffix: str) -> str:
    return f"{VIDEO_FOLDER}/{task_id}{suffix}"


def is_well_formed_public_path(public_path: str) -> bool:
    """True for ``outputs/<relative parts>`` without ``..``, empty parts, backslashes or NULs."""
    if not public_path or "\\" in public_path or "\x00" in public_path:
        return False
    parts = PurePosixPath(public_path).parts
    return len(parts) >= 2 and parts[0] == PUBLIC_OUTPUT_PREFIX and not any(p in ("", ".", "..", "/") for p in parts[1:])


def resolve_public_path(public_path: str) -> str | None:
    """The storage name a public output path names, or None when it is malformed or not there.

    On the filesystem the file must also be a plain file reached without symlinks inside the root.
    """
    if not is_well_formed_public_path(public_path):
        return None
    name = "/".join(PurePosixPath(public_path).parts[1:])
    store = outputs()
    if isinstance(store, FileSystemStorage):
        root = Path(store.location).resolve()
        literal = root / name
        try:
            resolved = literal.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if resolved != literal or not resolved.is_relative_to(root) or not resolved.is_file():
            return None
        return name
    return name if store.exists(name) else None


def publish_output(local_file: Path, task_id: uuid.UUID, suffix: str) -> str:
    """Copy a finished local file into the outputs store as the task's video/poster; returns its public path.

    Readers never see a partial file: the path is only published (on the task row) after this returns.
    """
    name = _video_name(task_id, suffix)
    store = outputs()
    store.delete(name)  # a re-run replaces its own earlier output
    with local_file.open("rb") as handle:
        saved = store.save(name, File(handle, name=Path(name).name))
    if saved != name:
        raise RuntimeError(f"output storage saved {name} as {saved}")
    return video_public_path(task_id, suffix)


class OutputFiles:
    """Where one run writes its task's video and poster, and :meth:`publish`, which puts them at the
    task's public paths.

    The run writes under names of its own (its attempt number in them), so a run that lost its task
    while encoding never overwrites, nor on its way out deletes, what a later run of the same task
    published. Each file is written atomically (readers never see part of one).
    """

    def __init__(self, task_id: uuid.UUID, attempt: int, folder: Path, in_place: bool):
        self.task_id, self._in_place = task_id, in_place
        self.video, self.poster = (folder / _run_file_name(task_id, attempt, suffix) for suffix in (".mp4", ".jpg"))
        self.video_path, self.poster_path = video_public_path(task_id, ".mp4"), video_public_path(task_id, ".jpg")

    def publish(self) -> None:
        """Move (filesystem store) or upload (others) the files to the public paths.

        Only for the run that holds its task, with the row locked until this commits
        (``services.task_finish``): no other run publishes meanwhile. Safe to repeat after a commit
        that failed (a file already moved is left in place). On an error nothing of the task is left
        at the public paths.
        """
        try:
            for written, suffix in ((self.video, ".mp4"), (self.poster, ".jpg")):
                if not self._in_place:
                    publish_output(written, self.task_id, suffix)
                    continue
                public = Path(outputs().path(_video_name(self.task_id, suffix)))
                if written.exists() or not public.exists():  # else a repeat: moved already
                    os.replace(written, public)
        except BaseException:
            delete_outputs(self.task_id)
            raise

    def discard(self) -> None:
        """Remove this run's own files (never the published ones, which may be another run's)."""
        for written in (self.video, self.poster):
            written.unlink(missing_ok=True)


@contextlib.contextmanager
def output_files(task_id: uuid.UUID, attempt: int) -> Iterator[OutputFiles]:
    """Where run ``attempt`` of ``task_id`` writes its outputs: beside their public places on the
    filesystem store (published by a rename, no copy), otherwise in a scratch folder, removed at the
    end, that :meth:`OutputFiles.publish` uploads from. An exception discards this run's files.
    """
    store = outputs()
    if isinstance(store, FileSystemStorage):
        folder = Path(store.path(VIDEO_FOLDER))
        folder.mkdir(parents=True, exist_ok=True)
        output = OutputFiles(task_id, attempt, folder, in_place=True)
        try:
            yield output
        except BaseException:
            output.discard()
            raise
    else:
        with tempfile.TemporaryDirectory(prefix="lightx2v-") as scratch:
            yield OutputFiles(task_id, attempt, Path(scratch), in_place=False)


def discard_run_files(task_id: uuid.UUID, attempt: int) -> None:
    """Remove what run ``attempt`` of ``task_id`` left unpublished in the filesystem store (its own
    files and their temp files), e.g. after its worker died. Only for a run that lost its task:
    such a run can no longer publish them. Other stores hold nothing until a publish."""
    store = outputs()
    if not isinstance(store, FileSystemStorage):
        return
    folder = Path(store.path(VIDEO_FOLDER))
    for suffix in (".mp4", ".jpg"):
        name = _run_file_name(task_id, attempt, suffix)
        for leftover in [folder / name, *folder.glob(f".{name}.*.part")]:  # and inference.encode.AtomicFile's temps
            leftover.unlink(missing_ok=True)


def runs_with_files(*, idle_s: float) -> set[tuple[uuid.UUID, int]]:
    """The (task id, attempt) of each run with a file in the filesystem store (its own or an encoder's
    temp file) that has not changed for ``idle_s``; empty for other stores, which hold nothing of a run."""
    store = outputs()
    if not isinstance(store, FileSystemStorage):
        return set()
    folder, cutoff = Path(store.path(VIDEO_FOLDER)), time.time() - idle_s
    runs = set()
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            found = _RUN_FILE.fullmatch(entry.name)
            with contextlib.suppress(FileNotFoundError):  # published or discarded meanwhile
                if found and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    runs.add((uuid.UUID(found["task_id"]), int(found["attempt"])))
    return runs


# A run's file (see _run_file_name) or an AtomicFile temp of one: ".<name>.<random>.part".
_RUN_FILE = re.compile(r"\.\.?(?P<task_id>[0-9a-f-]{36})\.attempt-(?P<attempt>\d+)\.(?:mp4|jpg)(?:\..+\.part)?")


def _run_file_name(task_id: uuid.UUID, attempt: int, suffix: str) -> str:
    """The name run ``attempt`` writes a file under until it publishes it (hidden, in the videos folder)."""
    return f".{task_id}.attempt-{attempt}{suffix}"


def delete_outputs(task_id: uuid.UUID) -> None:
    """Remove a task's video and poster (a run that lost its task leaves nothing behind)."""
    for suffix in (".mp4", ".jpg"):
        outputs().delete(_video_name(task_id, suffix))


def save_input_image(image: Image.Image, task_id: uuid.UUID) -> str:
    """Store a verified input image as PNG under a server-chosen name; returns that name."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return uploads().save(f"{task_id}.png", ContentFile(buffer.getvalue()))


def delete_input_image(name: str) -> None:
    """Remove a stored input image (by the name ``save_input_image`` returned); gone already is fine."""
    uploads().delete(PurePosixPath(name).name)


def open_input_image(name: str) -> Image.Image:
    """Load a stored input image by the name ``save_input_image`` returned."""
    with uploads().open(PurePosixPath(name).name, "rb") as handle, Image.open(handle) as image:
        return image.convert("RGB")


def stored_input_image(name: str) -> str | None:
    """``name`` if such a stored input image exists (for the admin's preview), else None."""
    name = PurePosixPath(name).name
    return name if name and uploads().exists(name) else None


def resolve_input_path(client_path: str) -> Path | None:
    """A client's ``image_path`` as a file inside one of ``LIGHTX2V_INPUT_ROOTS``, or None.

    A relative path is looked up in each root in turn. Any ``..`` part is refused outright;
    symlinks are followed, then the real path must still sit inside that root.
    """
    if not client_path or "\x00" in client_path or ".." in Path(client_path).parts:
        return None
    for root in settings.LIGHTX2V_INPUT_ROOTS:
        try:
            real_root = Path(root).resolve(strict=True)
            resolved = (real_root / Path(client_path).expanduser()).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if resolved.is_relative_to(real_root) and resolved.is_file():
            return resolved
    return None
