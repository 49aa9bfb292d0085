"""The two file stores of the service, as Django ``STORAGES`` entries.

``outputs`` holds finished videos and posters (``videos/<task_id>.mp4|.jpg``), ``uploads`` the stored
input images. ``filesystem`` keeps them in two local folders; ``s3`` in one S3-compatible bucket under
the prefixes ``outputs/`` and ``uploads/``, so web and workers on different machines share them.
Credentials for S3 come from the usual AWS environment (``AWS_ACCESS_KEY_ID``, ...).
"""
from pathlib import Path

BACKENDS = ("filesystem", "s3")


def build_storages(backend: str, *, output_root: Path, upload_root: Path, bucket: str = "", endpoint_url: str = ""):
    """The ``outputs`` and ``uploads`` entries of ``STORAGES`` for ``backend``."""
    if backend == "filesystem":
        return {
            "outputs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": output_root}},
            "uploads": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": upload_root}},
        }
    if backend == "s3":
        if not bucket:
            raise ValueError("LIGHTX2V_STORAGE=s3 needs LIGHTX2V_S3_BUCKET")
        common = {"bucket_name": bucket, "endpoint_url": endpoint_url or None, "file_overwrite": True}
        return {
            area: {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {**common, "location": area}}
            for area in ("outputs", "uploads")
        }
    raise ValueError(f"LIGHTX2V_STORAGE must be one of {', '.join(BACKENDS)}, not {backend!r}")
