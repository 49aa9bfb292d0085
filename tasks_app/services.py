"""Every state change of a ``VideoTask``, and nothing else.

Each transition is one conditional ``UPDATE ... WHERE status = <expected>`` inside a transaction, so
when two actors race (a user cancelling, a worker finishing, two workers claiming) exactly one wins
and the loser learns it from the row count. A finished task (succeed, failed, cancelled) is never
changed again except by an explicit retry.
"""
import logging
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone
from django_q.tasks import async_task
from PIL import Image

from . import storage
from .errors import (
    IdempotencyKeyReused,
    QueueFull,
    TaskNotCancellable,
    TaskNotRetryable,
    TooManyUnfinishedTasks,
)
from .models import IdempotencyKey, VideoTask

logger = logging.getLogger(__name__)

Status = VideoTask.Status
MAX_SEED = 2**32 - 1
WORKER_ENTRY = "tasks_app.worker.run_next_task"


class TaskNoLongerRunning(Exception):
    """Raised to a worker whose task left ``running`` under it (cancelled by a user)."""


def _wake_workers() -> None:
    """Queue a "there is work" message; the row, not the message, says which task runs."""
    async_task(WORKER_ENTRY, task_name="video-task")


@dataclass(frozen=True)
class Submission:
    """What a submit produced: the task, and whether it is new (False: an Idempotency-Key replay)."""

    task: VideoTask
    created: bool


def task_submit(
    *,
    owner,
    params: dict[str, Any],
    image: Image.Image | None = None,
    idempotency_key: str = "",
    request_fingerprint: str = "",
) -> Submission:
    """Create a submitted task from validated ``params`` and queue it; draws the seed if absent.

    With an ``idempotency_key`` that is live for ``owner``: the same ``request_fingerprint``
    returns the original task (``created=False``), another raises ``IdempotencyKeyReused``.
    Raises ``TooManyUnfinishedTasks`` / ``QueueFull`` over the configured caps. The row, its
    idempotency key and its queue message are written in one transaction (the broker is this
    database), so a task is never queued without a row nor stored without a message.
    """
    with transaction.atomic():
        # One owner's submits run one at a time, so cap checks and key lookups see each other.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
        if idempotency_key:
            replayed = _replay(owner=owner, key=idempotency_key, request_fingerprint=request_fingerprint)
            if replayed is not None:
                return Submission(task=replayed, created=False)
        _check_limits(owner=owner)
        fields = dict(params)
        if fields.get("seed") is None:
            fields["seed"] = random.randint(0, MAX_SEED)
        task = VideoTask(owner=owner, **fields)
        task.task_type = VideoTask.TaskType.I2V if image is not None else VideoTask.TaskType.T2V
        task.message = "queued"
        if image is not None:
            task.input_image = storage.save_input_image(image, task.task_id)
        task.save(force_insert=True)
        if idempotency_key:
            IdempotencyKey.objects.create(
                owner=owner, key=idempotency_key, request_fingerprint=request_fingerprint, task=task
            )
        _wake_workers()
    return Submission(task=task, created=True)


def _replay(*, owner, key: str, request_fingerprint: str) -> VideoTask | None:
    """The task a live key of ``owner`` already made, or None (an expired key is dropped)."""
    expired_before = timezone.now() - timedelta(seconds=settings.LIGHTX2V_IDEMPOTENCY_TTL_S)
    IdempotencyKey.objects.filter(owner=owner, key=key, created_at__lt=expired_before).delete()
    live = IdempotencyKey.objects.select_related("task").filter(owner=owner, key=key).first()
    if live is None:
        return None
    if live.request_fingerprint != request_fingerprint:
        raise IdempotencyKeyReused("Idempotency-Key was already used with a different request body")
    return live.task


def _check_limits(*, owner) -> None:
    unfinished = VideoTask.objects.filter(owner=owner, status__in=[Status.SUBMITTED, Status.RUNNING]).count()
    if unfinished >= settings.LIGHTX2V_MAX_UNFINISHED_PER_USER:
        raise TooManyUnfinishedTasks(
            f"you have {unfinished} unfinished tasks; the limit is {settings.LIGHTX2V_MAX_UNFINISHED_PER_USER}",
            retry_after_s=settings.LIGHTX2V_RETRY_AFTER_S,
        )
    if VideoTask.objects.filter(status=Status.SUBMITTED).count() >= settings.LIGHTX2V_MAX_QUEUED:
        raise QueueFull(
            f"the queue is full ({settings.LIGHTX2V_MAX_QUEUED} tasks waiting); try again later",
            retry_after_s=settings.LIGHTX2V_RETRY_AFTER_S,
        )


def task_claim_next(*, worker_name: str) -> VideoTask | None:
    """Atomically move the oldest submitted task to ``running`` for ``worker_name``; None if none.

    ``SKIP LOCKED`` lets concurrent workers pass over each other's candidate rows on PostgreSQL;
    the conditional update makes the claim safe on databases without row locks too.
    """
    while True:
        with transaction.atomic():
            candidate = (
                VideoTask.objects.select_for_update(skip_locked=True)
                .filter(status=Status.SUBMITTED)
                .order_by("queued_at")
                .values_list("pk", flat=True)
                .first()
            )
            if candidate is None:
                return None
            now = timezone.now()
            claimed = VideoTask.objects.filter(pk=candidate, status=Status.SUBMITTED).update(
                status=Status.RUNNING,
                started_at=now,
                heartbeat_at=now,
                attempts=F("attempts") + 1,
                worker_name=worker_name,
                progress=0.0,
                message="loading model",
            )
        if claimed:
            return VideoTask.objects.get(pk=candidate)


def task_report_progress(*, task_id, progress: float, message: str) -> None:
    """Record progress of a running task (kept monotonic); raise ``TaskNoLongerRunning`` if it was cancelled."""
    updated = VideoTask.objects.filter(pk=task_id, status=Status.RUNNING).update(
        progress=Greatest(F("progress"), Value(min(progress, 1.0))),
        message=message,
        heartbeat_at=timezone.now(),
    )
    if not updated:
        raise TaskNoLongerRunning(str(task_id))


def task_finish(*, task_id, file_path: str, run_stats: dict[str, Any]) -> bool:
    """Mark a running task succeeded with its video; False if it was cancelled meanwhile."""
    return bool(
        VideoTask.objects.filter(pk=task_id, status=Status.RUNNING).update(
            status=Status.SUCCEED,
            progress=1.0,
            message="completed",
            file_path=file_path,
            run_stats=run_stats,
            finished_at=timezone.now(),
        )
    )


def task_fail(*, task_id, error: str, run_stats: dict[str, Any] | None = None) -> bool:
    """Mark a running task failed with a readable reason; False if it was no longer running."""
    reason = error.strip().splitlines()[0][:400] if error.strip() else "unknown error"
    return bool(
        VideoTask.objects.filter(pk=task_id, status=Status.RUNNING).update(
            status=Status.FAILED,
            message=f"failed: {reason}",
            error=error,
            run_stats=run_stats or {},
            finished_at=timezone.now(),
        )
    )


def task_record_run_stats(*, task_id, run_stats: dict[str, Any]) -> None:
    """Attach run statistics to a task without touching its status (e.g. where a cancel stopped it)."""
    VideoTask.objects.filter(pk=task_id).update(run_stats=run_stats)


def task_cancel(*, task: VideoTask) -> VideoTask:
    """Cancel a submitted task (it will never run) or a running one (its worker stops at the next step).

    Raises ``TaskNotCancellable`` when the task already finished.
    """
    was_running = task.status == Status.RUNNING
    now = timezone.now()
    cancelled = VideoTask.objects.filter(pk=task.pk, status__in=[Status.SUBMITTED, Status.RUNNING]).update(
        status=Status.CANCELLED, message="cancelled by user", finished_at=now
    )
    task.refresh_from_db()
    if not cancelled:
        raise TaskNotCancellable(f"task is already {task.status}", task=task)
    logger.info("task %s cancelled (was %s)", task.pk, "running" if was_running else "queued")
    return task


def task_retry(*, task: VideoTask) -> VideoTask:
    """Queue a failed or cancelled task again, at the back of the queue; its attempt count is kept."""
    with transaction.atomic():
        retried = VideoTask.objects.filter(pk=task.pk, status__in=[Status.FAILED, Status.CANCELLED]).update(
            status=Status.SUBMITTED,
            progress=0.0,
            message="queued (retry)",
            error="",
            file_path="",
            queued_at=timezone.now(),
            started_at=None,
            heartbeat_at=None,
            finished_at=None,
        )
        if retried:
            _wake_workers()
    task.refresh_from_db()
    if not retried:
        raise TaskNotRetryable(f"only failed or cancelled tasks can be retried; this one is {task.status}", task=task)
    return task
