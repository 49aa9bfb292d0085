"""Retention: the files of tasks that finished more than ``LIGHTX2V_RETENTION_DAYS`` ago are removed,
and a deleted task's files go with its row.

The rows stay (history, statistics, the admin); a finished task whose files are gone keeps its status
and says so in its message, ``/result`` answers 410 and a download 404. Workers run
``expire_finished_files`` from their heartbeat (see ``worker_process``); 0 days keeps files forever.
"""
import logging
import uuid
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from . import storage
from .models import VideoTask

logger = logging.getLogger(__name__)

BATCH = 100
EXPIRED_MESSAGE = "files removed after the retention period"


def expire_finished_files(*, days: float) -> int:
    """Remove the video, poster and input image of up to ``BATCH`` tasks that finished over ``days``
    ago and still have files; returns how many. Rows another worker holds are skipped."""
    if days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    with transaction.atomic():
        expired = list(
            VideoTask.objects.select_for_update(skip_locked=True)
            .filter(status__in=VideoTask.FINISHED_STATUSES, finished_at__lt=cutoff)
            .exclude(file_path="", poster_path="", input_image="")[:BATCH]
        )
        for task in expired:
            _remove_files(task.pk, task.input_image)
        VideoTask.objects.filter(pk__in=[task.pk for task in expired]).update(
            file_path="", poster_path="", input_image="", message=EXPIRED_MESSAGE
        )
    if expired:
        logger.info("removed the files of %d tasks finished over %g days ago", len(expired), days)
    return len(expired)


def remove_files_of_deleted_task(sender, instance: VideoTask, **kwargs) -> None:
    """``post_delete`` receiver: once a task's deletion commits (the admin, a deleted user's tasks, a
    ``QuerySet.delete()``), its video, poster and input image are removed; nothing refers to them then."""
    task_id, input_image = instance.pk, instance.input_image
    transaction.on_commit(lambda: _remove_files(task_id, input_image), robust=True)  # a failed remove logs


def _remove_files(task_id: uuid.UUID, input_image: str) -> None:
    """Remove a task's video and poster, and its input image when it has one."""
    storage.delete_outputs(task_id)
    if input_image:
        storage.delete_input_image(input_image)
