"""Every state change of a ``VideoTask``, and nothing else.

Each transition is one conditional ``UPDATE ... WHERE status = <expected>`` inside a transaction, so
when two actors race (a user cancelling, a worker finishing, two workers claiming) exactly one wins
and the loser learns it from the row count. A finished task (succeed, failed, cancelled) is never
changed again except by an explicit retry.
"""
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, F, Q, Value
from django.db.models.functions import Greatest, Now
from django.utils import timezone
from PIL import Image

from . import commits, selectors, statements, storage, wakeups, webhooks
from .errors import IdempotencyKeyReused, QueueFull, TaskNotCancellable, TaskNotRetryable, TooManyUnfinishedTasks
from .models import IdempotencyKey, TaskAttempt, VideoTask

logger = logging.getLogger(__name__)

Status = VideoTask.Status
MAX_SEED = 2**32 - 1
CLAIMED_MESSAGE = "loading model"


class TaskNoLongerRunning(Exception):
    """Raised to a worker whose task left ``running`` under it (cancelled by a user)."""


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
    database), so a task is never queued without a row nor stored without a message. ``image``
    is stored before that transaction (its encode and write hold no lock) and removed again
    unless the submit created the task.
    """
    task = VideoTask(owner=owner, **params)
    stored_image = storage.save_input_image(image, task.task_id) if image is not None else ""
    created = False
    try:
        submission = _submit(task, stored_image, idempotency_key, request_fingerprint)
        created = submission.created
        return submission
    finally:
        if stored_image and not created:
            storage.delete_input_image(stored_image)


def _submit(task: VideoTask, stored_image: str, idempotency_key: str, request_fingerprint: str) -> Submission:
    """Store and queue the unsaved ``task`` (with ``stored_image`` as its input, if any) or replay."""
    owner = task.owner
    with transaction.atomic():
        # One owner's submits run one at a time, so cap checks and key lookups see each other.
        if statements.supported():
            statements.lock_owner(owner_id=owner.pk)
        else:
            get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
        if idempotency_key:
            replayed = _replay(owner=owner, key=idempotency_key, request_fingerprint=request_fingerprint)
            if replayed is not None:
                return Submission(task=replayed, created=False)
        _check_limits(owner=owner)
        if task.seed is None:
            task.seed = random.randint(0, MAX_SEED)
        task.task_type = VideoTask.TaskType.I2V if stored_image else VideoTask.TaskType.T2V
        task.message = "queued"
        task.input_image = stored_image
        task.save(force_insert=True)
        if idempotency_key:
            IdempotencyKey.objects.create(
                owner=owner, key=idempotency_key, request_fingerprint=request_fingerprint, task=task
            )
        wakeups.wake_workers()
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
    if statements.supported():
        unfinished, queued = statements.unfinished_counts(owner_id=owner.pk)
    else:
        counts = VideoTask.objects.filter(status__in=[Status.SUBMITTED, Status.RUNNING]).aggregate(
            unfinished=Count("pk", filter=Q(owner=owner)), queued=Count("pk", filter=Q(status=Status.SUBMITTED))
        )
        unfinished, queued = counts["unfinished"], counts["queued"]
    limit = settings.LIGHTX2V_MAX_UNFINISHED_PER_USER
    if unfinished >= limit:
        raise TooManyUnfinishedTasks(
            f"you have {unfinished} unfinished tasks; the limit is {limit}",
            retry_after_s=settings.LIGHTX2V_RETRY_AFTER_S,
        )
    if queued >= settings.LIGHTX2V_MAX_QUEUED:
        raise QueueFull(
            f"the queue is full ({settings.LIGHTX2V_MAX_QUEUED} tasks waiting); try again later",
            retry_after_s=settings.LIGHTX2V_RETRY_AFTER_S,
        )


def task_claim_next(*, worker_name: str) -> VideoTask | None:
    """Atomically move the next submitted task to ``running`` for ``worker_name``; None if none.

    Next in the claim order, fair between users (``selectors.TURNS_SQL``); within one user's tasks
    the earliest ``queued_at`` (a recovered task keeps its place). ``SKIP LOCKED`` lets concurrent
    workers pass over each other's candidate rows on PostgreSQL; the conditional update makes the
    claim safe on databases without row locks too.
    The returned task's ``worker_name`` and ``attempt_count`` identify this run: every later
    write of the run is conditional on them, so a worker that lost its lease changes nothing.
    On PostgreSQL it is one statement (``statements.claim_next``), the same changes as below.
    """
    # A process claims only while it runs nothing: a row running under its name is a claim whose
    # commit went through while the answer was lost (the claim was retried), or one of a dead process
    # whose pid this one got. It is this process's to run, rather than a second task's.
    unfinished = VideoTask.objects.filter(status=Status.RUNNING, worker_name=worker_name).first()
    if unfinished is not None:
        return unfinished
    if statements.supported():
        return statements.claim_next(worker_name=worker_name, message=CLAIMED_MESSAGE)
    for task_id in selectors.claim_order():
        with transaction.atomic():
            task = VideoTask.objects.select_for_update(skip_locked=True).filter(pk=task_id).first()
            if task is None or task.status != Status.SUBMITTED:
                continue  # claimed (or cancelled) meanwhile
            now = timezone.now()
            claim = dict(
                status=Status.RUNNING,
                started_at=now,
                heartbeat_at=now,
                attempt_count=task.attempt_count + 1,  # the row is locked: nobody changed it since the read
                worker_name=worker_name,
                message=CLAIMED_MESSAGE,
                run_stats={},  # an earlier run's statistics would give this one its ETA
            )
            if VideoTask.objects.filter(pk=task.pk, status=Status.SUBMITTED).update(**claim):
                for name, value in claim.items():
                    setattr(task, name, value)
                TaskAttempt.objects.create(
                    task=task, number=task.attempt_count, worker_name=worker_name, started_at=now
                )
                return task
    return None


def _this_run(task: VideoTask):
    """The task's row, only while it is still running under the lease ``task`` was claimed with."""
    return VideoTask.objects.filter(
        pk=task.pk, status=Status.RUNNING, worker_name=task.worker_name, attempt_count=task.attempt_count
    )


def _notify(task: VideoTask) -> None:
    """Queue the webhook of a task that just reached a terminal state (same transaction).

    ``callback_url`` is fixed at submit, so ``task`` as claimed tells whether there is one to call.
    """
    if task.callback_url:
        webhooks.enqueue(VideoTask.objects.get(pk=task.pk))


def _end_attempt(task: VideoTask, outcome: str, error: str = "") -> None:
    TaskAttempt.objects.filter(task_id=task.pk, number=task.attempt_count, finished_at__isnull=True).update(
        outcome=outcome, error=error, finished_at=timezone.now()
    )


def _end_run(task: VideoTask, changes: dict[str, Any], outcome: str, error: str = "") -> bool:
    """Apply ``changes`` to the row while this run still holds it, and close the run's attempt with
    ``outcome`` and ``error``; False (nothing changed) if the run no longer held the task.

    On PostgreSQL one statement (``statements.finish_run``), elsewhere two ORM updates. Callers hold
    a transaction; its commit is durable even in a worker, whose other commits are not (``commits``).
    """
    commits.durable()
    if statements.supported():
        return statements.finish_run(task=task, changes=changes, outcome=outcome, attempt_error=error)
    if not _this_run(task).update(**changes):
        return False
    _end_attempt(task, outcome, error)
    return True


def task_heartbeat(*, task: VideoTask) -> bool:
    """Extend this run's lease; False when the run no longer holds it (cancelled, or taken back)."""
    return bool(_this_run(task).update(heartbeat_at=Now()))


def task_report_progress(
    *, task: VideoTask, progress: float, message: str, run_stats: dict[str, Any] | None = None
) -> None:
    """Record progress of this run (kept monotonic, with the run's statistics so far when given);
    raise ``TaskNoLongerRunning`` once it lost the task."""
    changes: dict[str, Any] = {"run_stats": run_stats} if run_stats is not None else {}
    updated = _this_run(task).update(
        progress=Greatest(F("progress"), Value(min(progress, 1.0))),
        message=message,
        heartbeat_at=Now(),
        **changes,
    )
    if not updated:
        raise TaskNoLongerRunning(str(task.pk))


def task_finish(
    *,
    task: VideoTask,
    file_path: str,
    poster_path: str,
    video_info: dict[str, Any],
    run_stats: dict[str, Any],
    publish: Callable[[], None] | None = None,
) -> bool:
    """Mark this run succeeded with its video and poster; False if it lost the task meanwhile.

    ``publish`` puts the files at ``file_path`` and ``poster_path``: called only when the run still
    holds the task, while the row is locked by this update, before the commit; if it raises, nothing
    is committed and the exception propagates.
    """
    succeeded = dict(
        status=Status.SUCCEED,
        progress=1.0,
        message="completed",
        file_path=file_path,
        poster_path=poster_path,
        video_info=video_info,
        run_stats=run_stats,
        finished_at=timezone.now(),
    )
    with transaction.atomic():
        finished = _end_run(task, succeeded, TaskAttempt.Outcome.SUCCEED)
        if finished:
            if publish is not None:
                publish()
            _notify(task)
    return finished


def task_fail(
    *, task: VideoTask, error: str, run_stats: dict[str, Any] | None = None, timed_out: bool = False
) -> bool:
    """Mark this run failed: the owner sees ``error``'s first line, operators all; False if it lost the task."""
    reason = error.strip().splitlines()[0][:400] if error.strip() else "unknown error"
    changes = dict(
        status=Status.FAILED, message=f"failed: {reason}", error=error, run_stats=run_stats or {},
        finished_at=timezone.now(),
    )  # fmt: skip
    outcome = TaskAttempt.Outcome.TIMED_OUT if timed_out else TaskAttempt.Outcome.FAILED
    with transaction.atomic():
        failed = _end_run(task, changes, outcome, reason)  # the owner sees attempts
        if failed:
            _notify(task)
    return failed


def task_hand_back(*, task: VideoTask, reason: str) -> bool:
    """Return this run's task to the queue at its old place (the worker is shutting down)."""
    changes = dict(status=Status.SUBMITTED, message=f"queued again: {reason}", heartbeat_at=None)
    with transaction.atomic():
        handed_back = _end_run(task, changes, TaskAttempt.Outcome.HANDED_BACK, reason)
        if handed_back:
            wakeups.wake_workers()
    return handed_back


def task_record_run_stats(*, task: VideoTask, run_stats: dict[str, Any]) -> None:
    """Attach a stopped run's statistics to its task where that run ended it (cancelled, or reaped to
    failed); never to a task queued or running again."""
    VideoTask.objects.filter(
        pk=task.pk, attempt_count=task.attempt_count, worker_name=task.worker_name,
        status__in=[Status.CANCELLED, Status.FAILED],
    ).update(run_stats=run_stats)  # fmt: skip


def task_reap_stale(*, lease_s: float, max_attempts: int) -> list[VideoTask]:
    """Take back running tasks whose heartbeat is older than ``lease_s``; returns them as updated.

    Each goes back to ``submitted`` at its old place in the queue, or to ``failed`` once
    ``max_attempts`` of its runs were lost since it was submitted or retried (runs handed back on a
    worker's shutdown do not count); its open attempt is recorded as lost and the files that run
    left unpublished are removed. Safe to call from every worker at once: rows another reaper
    holds are skipped.
    """
    cutoff = Now() - Value(timedelta(seconds=lease_s))  # heartbeats are the database's time too
    reaped = []
    with transaction.atomic():
        stale = VideoTask.objects.select_for_update(skip_locked=True).filter(
            status=Status.RUNNING, heartbeat_at__lt=cutoff
        )
        for task in stale:
            lost = f"worker {task.worker_name} stopped heartbeating (lease {lease_s:g} s)"
            _end_attempt(task, TaskAttempt.Outcome.LOST, lost)
            task.lost_runs += 1
            if task.lost_runs >= max_attempts:
                task.status, task.finished_at = Status.FAILED, timezone.now()
                task.message = f"failed: gave up after {task.lost_runs} lost runs; last: {lost}"
                task.error = task.message
            else:
                task.status, task.heartbeat_at = Status.SUBMITTED, None
                task.message = f"queued again: {lost}"
                wakeups.wake_workers()
            task.save(update_fields=["status", "message", "error", "heartbeat_at", "finished_at", "lost_runs"])
            if task.status == Status.FAILED:
                webhooks.enqueue(task)
            logger.warning("task %s reaped: %s", task.pk, task.message)
            reaped.append(task)
    for task in reaped:  # the lost run can no longer publish what it wrote
        storage.discard_run_files(task.pk, task.attempt_count)
    return reaped


def task_cancel(*, task: VideoTask) -> VideoTask:
    """Cancel a submitted task (it will never run) or a running one (its worker stops at the next step).

    Raises ``TaskNotCancellable`` when the task already finished.
    """
    was_running = task.status == Status.RUNNING
    with transaction.atomic():
        cancelled = VideoTask.objects.filter(pk=task.pk, status__in=[Status.SUBMITTED, Status.RUNNING]).update(
            status=Status.CANCELLED, message="cancelled by user", finished_at=timezone.now()
        )
        task.refresh_from_db()
        if cancelled:
            _end_attempt(task, TaskAttempt.Outcome.CANCELLED, "cancelled by user")
            webhooks.enqueue(task)
            wakeups.notify(wakeups.CANCEL_CHANNEL, str(task.pk))  # a worker running it stops at the next step
    if not cancelled:
        raise TaskNotCancellable(f"task is already {task.status}", task=task)
    logger.info("task %s cancelled (was %s)", task.pk, "running" if was_running else "queued")
    return task


def task_retry(*, task: VideoTask) -> VideoTask:
    """Queue a failed or cancelled task again, at the back of the queue; its attempt count is kept and
    its progress starts over (the one way it goes back: a run handed back or reaped keeps it). Webhooks
    of its earlier end that are not delivered yet are dropped."""
    if task.task_type == VideoTask.TaskType.I2V and not task.input_image:
        raise TaskNotRetryable("its input image was removed after the retention period", task=task)
    with transaction.atomic():
        retried = VideoTask.objects.filter(pk=task.pk, status__in=[Status.FAILED, Status.CANCELLED]).update(
            status=Status.SUBMITTED,
            progress=0.0,
            message="queued (retry)",
            error="",
            file_path="",
            poster_path="",
            video_info={},
            run_stats={},
            lost_runs=0,
            queued_at=timezone.now(),
            started_at=None,
            heartbeat_at=None,
            finished_at=None,
        )
        if retried:
            webhooks.supersede(task)
            wakeups.wake_workers()
    task.refresh_from_db()
    if not retried:
        raise TaskNotRetryable(f"only failed or cancelled tasks can be retried; this one is {task.status}", task=task)
    return task
