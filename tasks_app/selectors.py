"""Reads with logic: queue position, per-status counts, live workers, a user's tasks."""
from django.db.models import Count, QuerySet
from django_q.status import Stat

from .models import VideoTask

Status = VideoTask.Status


def tasks_of(*, owner, status: str | None = None) -> QuerySet[VideoTask]:
    """The owner's tasks, newest first, optionally of one status."""
    tasks = VideoTask.objects.filter(owner=owner).prefetch_related("attempt_records").order_by("-created_at")
    return tasks.filter(status=status) if status else tasks


def queue_position(*, task: VideoTask) -> int:
    """1 for the next task a worker will claim; counts every user's tasks queued before this one."""
    return VideoTask.objects.filter(status=Status.SUBMITTED, queued_at__lt=task.queued_at).count() + 1


def status_counts() -> dict[str, int]:
    """Number of tasks per status, every status present (zero when none)."""
    counts = dict.fromkeys(Status.values, 0)
    for row in VideoTask.objects.values("status").annotate(total=Count("pk")).order_by():
        counts[row["status"]] = row["total"]
    return counts


def live_worker_count() -> int:
    """Worker processes of running qclusters that reported in the last few seconds (django-q2 stats)."""
    return sum(len(stat.workers) for stat in Stat.get_all())


def recent_step_seconds(*, limit: int) -> list[float]:
    """Mean step times (``run_stats["step_s"]``) of the last ``limit`` succeeded tasks, newest first."""
    recent = VideoTask.objects.filter(status=Status.SUCCEED).order_by("-finished_at")[:limit]
    return [float(step_s) for step_s in recent.values_list("run_stats__step_s", flat=True) if step_s is not None]


def recent_mean_duration_s(*, limit: int = 50) -> float | None:
    """Mean claim-to-finish seconds of the last ``limit`` succeeded tasks, or None without history."""
    recent = VideoTask.objects.filter(status=Status.SUCCEED, started_at__isnull=False).order_by("-finished_at")
    spans = [(done - began).total_seconds() for began, done in recent.values_list("started_at", "finished_at")[:limit]]
    return sum(spans) / len(spans) if spans else None


def eta_seconds(*, task: VideoTask) -> float | None:
    """Estimated seconds until ``task`` finishes, from recent step times and durations; None if unknown.

    Running: the steps left at this run's own mean step time. Submitted: the tasks ahead of it
    shared among the live workers, plus itself, at the recent mean task duration.
    """
    if task.status == Status.RUNNING:
        step_s = task.run_stats.get("step_s")
        if step_s is None:
            return None
        steps_left = task.infer_steps * task.num_fragments - task.run_stats.get("steps_done", 0)
        return round(max(steps_left, 0) * step_s, 1)
    if task.status == Status.SUBMITTED:
        mean_duration = recent_mean_duration_s()
        if mean_duration is None:
            return None
        ahead = queue_position(task=task) - 1
        return round((ahead / max(live_worker_count(), 1) + 1) * mean_duration, 1)
    return None
