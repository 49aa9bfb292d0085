"""Where files live: input images under the upload root, videos under the output root.

Clients only ever see *public* paths such as ``outputs/videos/<task_id>.mp4``; this module maps
them to disk and refuses anything that would land outside the configured folders.
"""
import os
import uuid
from pathlib import Path, PurePosixPath

from django.conf import settings
from PIL import Image

PUBLIC_OUTPUT_PREFIX = "outputs"
VIDEO_FOLDER = "videos"


def output_root() -> Path:
    return Path(settings.LIGHTX2V_OUTPUT_ROOT).resolve()


def upload_root() -> Path:
    return Path(settings.LIGHTX2V_UPLOAD_ROOT).resolve()


def video_public_path(task_id: uuid.UUID, suffix: str = ".mp4") -> str:
    """The client-facing path of a task's video (or its ``.jpg`` poster), e.g. ``outputs/videos/<task_id>.mp4``."""
    return f"{PUBLIC_OUTPUT_PREFIX}/{VIDEO_FOLDER}/{task_id}{suffix}"


def is_well_formed_public_path(public_path: str) -> bool:
    """True for ``outputs/<relative parts>`` without ``..``, empty parts, backslashes or NULs."""
    if not public_path or "\\" in public_path or "\x00" in public_path:
        return False
    parts = PurePosixPath(public_path).parts
    return len(parts) >= 2 and parts[0] == PUBLIC_OUTPUT_PREFIX and not any(p in ("", ".", "..", "/") for p in parts[1:])


def resolve_public_path(public_path: str) -> Path | None:
    """The file a public output path names, or None when it is not a plain file inside the output root.

    Besides the syntax rules of ``is_well_formed_public_path``, refuses symlinks anywhere on the way:
    the resolved path must equal the literal one and stay under the root.
    """
    if not is_well_formed_public_path(public_path):
        return None
    root = output_root()
    literal = root.joinpath(*PurePosixPath(public_path).parts[1:])
    try:
        resolved = literal.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved != literal or not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved


def video_file_for(task_id: uuid.UUID, suffix: str = ".mp4") -> Path:
    """Where the worker writes a task's video (or its ``.jpg`` poster); the folder is created."""
    folder = output_root() / VIDEO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{task_id}{suffix}"


def save_input_image(image: Image.Image, task_id: uuid.UUID) -> str:
    """Store a verified input image as PNG under a server-chosen name; returns that name."""
    root = upload_root()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{task_id}.png"
    partial = root / f".{name}.partial"
    image.convert("RGB").save(partial, format="PNG")
    os.replace(partial, root / name)
    return name


def resolve_input_image(name: str) -> Path | None:
    """The stored input image file of ``name`` (as ``save_input_image`` returned), or None."""
    candidate = upload_root() / PurePosixPath(name).name
    return candidate if candidate.is_file() and not candidate.is_symlink() else None


def open_input_image(name: str) -> Image.Image:
    """Load a stored input image by the name ``save_input_image`` returned."""
    with Image.open(upload_root() / PurePosixPath(name).name) as image:
        return image.convert("RGB")


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
