"""Reads with logic: queue position, per-status counts, live workers, a user's tasks."""
import functools
import heapq
import time
import uuid

from django.core.signing import BadSignature
from django.db import connection
from django.db.models import Count, QuerySet
from django_q.brokers import get_broker
from django_q.conf import Conf
from django_q.signing import SignedPackage
from django_q.status import Stat

from . import rows
from .models import TaskAttempt, VideoTask

Status = VideoTask.Status
# Inputs of ETAs that change slowly, kept per process for this many seconds: polls do not recount them.
ESTIMATE_INPUTS_TTL_S = 2.0
_estimate_inputs: dict[str, tuple[float, object]] = {}


def _recently_computed(name: str, compute):
    """``compute()``, or its value from the last ``ESTIMATE_INPUTS_TTL_S`` seconds in this process."""
    now = time.monotonic()
    cached = _estimate_inputs.get(name)
    if cached is None or now - cached[0] >= ESTIMATE_INPUTS_TTL_S:
        cached = _estimate_inputs[name] = (now, compute())
    return cached[1]


def forget_estimate_inputs() -> None:
    """Drop this process's cached ETA inputs (the next estimate recomputes them)."""
    _estimate_inputs.clear()


@functools.cache
def _owned_task_query() -> tuple[str, list, list]:
    """The SQL of ``owned_task`` (built once per process) and the fields of its task and attempt columns."""
    task_fields, attempt_fields = list(VideoTask._meta.concrete_fields), list(TaskAttempt._meta.concrete_fields)
    tasks, attempts = VideoTask._meta.db_table, TaskAttempt._meta.db_table
    sql = (
        f'SELECT {rows.columns(*task_fields, *attempt_fields)} FROM "{tasks}"'
        f' LEFT JOIN "{attempts}" ON "{attempts}".task_id = "{tasks}".task_id'
        f' WHERE "{tasks}".task_id = %s AND "{tasks}".owner_id = %s ORDER BY "{attempts}".number'
    )
    return sql, task_fields, attempt_fields


def owned_task(*, owner, task_id: uuid.UUID) -> VideoTask | None:
    """``owner``'s task ``task_id``, or None (also for another user's task); its attempts, in order,
    are in ``loaded_attempts``.

    One plain query (``rows``; the task joined to its attempts, one row per attempt): this is the
    poll path, where building ORM queries was most of the cost.
    """
    sql, task_fields, attempt_fields = _owned_task_query()
    task_key = VideoTask._meta.pk.get_db_prep_value(task_id, connection)
    found = rows.converted_rows(sql, [task_key, owner.pk], task_fields + attempt_fields)
    if not found:
        return None
    split = len(task_fields)
    task = rows.instance(VideoTask, task_fields, found[0][:split])
    # A task without attempts comes back as one row whose attempt columns (id first) are NULL.
    task.loaded_attempts = [rows.instance(TaskAttempt, attempt_fields, row[split:]) for row in found if row[split]]
    return task


def tasks_of(*, owner, status: str | None = None) -> QuerySet[VideoTask]:
    """The owner's tasks, newest first, optionally of one status."""
    tasks = VideoTask.objects.filter(owner=owner).prefetch_related("attempt_records").order_by("-created_at")
    return tasks.filter(status=status) if status else tasks


_TASKS = VideoTask._meta.db_table
_OWNER = VideoTask._meta.get_field("owner").column
# The claim order, fair between users. A submitted task's turn is its owner's running tasks plus its
# rank among the owner's submitted ones (by queue time): the lowest turn runs first, then the earliest
# queued. So one user's twenty queued tasks hold back another user's task by one of them at most, and
# a user with tasks running waits behind users without. Params: TURNS_PARAMS. SQLite runs it too.
TURNS_SQL = f"""running AS (
    SELECT "{_OWNER}" AS owner, COUNT(*) AS n FROM "{_TASKS}" WHERE "status" = %s GROUP BY "{_OWNER}"
), turns AS (
    SELECT q."task_id", q."queued_at",
        COALESCE(r.n, 0) + ROW_NUMBER() OVER (PARTITION BY q."{_OWNER}" ORDER BY q."queued_at", q."task_id") AS turn
    FROM "{_TASKS}" q LEFT JOIN running r ON r.owner = q."{_OWNER}" WHERE q."status" = %s
)"""
TURNS_PARAMS = [Status.RUNNING, Status.SUBMITTED]
TURN_ORDER = 'turns.turn, turns."queued_at", turns."task_id"'
_AHEAD = f"""WITH {TURNS_SQL}
SELECT COUNT(*) FROM turns WHERE (turns.turn, turns."queued_at", turns."task_id")
    < (SELECT turn, "queued_at", "task_id" FROM turns WHERE "task_id" = %s)
"""  # the subquery runs once (it does not refer to the outer row)
_CLAIM_ORDER = f'WITH {TURNS_SQL} SELECT turns."task_id" FROM turns ORDER BY {TURN_ORDER}'


def queue_position(*, task: VideoTask) -> int:
    """1 for the next task a worker will claim: the submitted tasks of every user ahead of this one in
    the claim order (``TURNS_SQL``), plus one."""
    task_key = VideoTask._meta.pk.get_db_prep_value(task.pk, connection)
    ((ahead,),) = rows.plain_rows(_AHEAD, [*TURNS_PARAMS, task_key])
    return ahead + 1


def queue_positions(*, tasks: list[VideoTask]) -> dict[uuid.UUID, int]:
    """:func:`queue_position` of each of ``tasks`` still submitted, in one query (a page of a list)."""
    keys = [VideoTask._meta.pk.get_db_prep_value(task.pk, connection) for task in tasks]
    if not keys:
        return {}
    sql = f"""WITH {TURNS_SQL}
SELECT "task_id", position FROM (
    SELECT turns."task_id", ROW_NUMBER() OVER (ORDER BY {TURN_ORDER}) AS position FROM turns
) ranked WHERE "task_id" IN ({", ".join(["%s"] * len(keys))})"""
    to_python = VideoTask._meta.pk.to_python
    return {to_python(task_id): position for task_id, position in rows.plain_rows(sql, [*TURNS_PARAMS, *keys])}


def claim_order() -> list[uuid.UUID]:
    """The submitted tasks' ids in the order workers claim them (the ORM form of the claim reads it)."""
    to_python = VideoTask._meta.pk.to_python
    return [to_python(task_id) for (task_id,) in rows.plain_rows(_CLAIM_ORDER, TURNS_PARAMS)]


def running_runs(runs: set[tuple[uuid.UUID, int]]) -> set[tuple[uuid.UUID, int]]:
    """Those of the (task id, attempt) pairs that still hold their task (running): only they may publish."""
    task_ids = {task_id for task_id, _ in runs}
    running = VideoTask.objects.filter(pk__in=task_ids, status=Status.RUNNING).values_list("pk", "attempt_count")
    return runs & set(running)


def status_counts() -> dict[str, int]:
    """Number of tasks per status, every status present (zero when none)."""
    counts = dict.fromkeys(Status.values, 0)
    for row in VideoTask.objects.values("status").annotate(total=Count("pk")).order_by():
        counts[row["status"]] = row["total"]
    return counts


def cluster_stats() -> list[Stat]:
    """The django-q2 statistics of every qcluster that reported in the last few seconds; read-only.

    Instead of ``Stat.get_all``, which rewrites the cache's list of clusters on every call and,
    dropping an expired entry from it while iterating, skips the entry after it: a running cluster
    listed after one that had just stopped read as absent (a test saw ``live_workers`` 0 so).
    Expired entries are pruned by the clusters themselves when they register.
    """
    cache = get_broker().cache
    if cache is None:
        return []
    keys = cache.get(Conf.Q_STAT) or []
    packs = cache.get_many(keys)
    stats = []
    for key in keys:
        if key in packs:
            try:
                stats.append(SignedPackage.loads(packs[key]))
            except BadSignature:
                continue
    return stats


def live_worker_count() -> int:
    """Worker processes of running qclusters that reported in the last few seconds (django-q2 stats)."""
    return sum(len(stat.workers) for stat in cluster_stats())


def recent_step_seconds(*, limit: int) -> list[float]:
    """Mean step times (``run_stats["step_s"]``) of the last ``limit`` succeeded tasks, newest first."""
    recent = VideoTask.objects.filter(status=Status.SUCCEED).order_by("-finished_at")[:limit]
    return [float(step_s) for step_s in recent.values_list("run_stats__step_s", flat=True) if step_s is not None]


def recent_mean_duration_s(*, limit: int = 50) -> float | None:
    """Mean claim-to-finish seconds of the last ``limit`` succeeded tasks, or None without history."""
    recent = VideoTask.objects.filter(status=Status.SUCCEED, started_at__isnull=False).order_by("-finished_at")
    spans = [(done - began).total_seconds() for began, done in recent.values_list("started_at", "finished_at")[:limit]]
    return sum(spans) / len(spans) if spans else None


def eta_seconds(*, task: VideoTask, position: int | None = None) -> float | None:
    """Estimated seconds until ``task`` finishes, from recent step times and durations; None if unknown.

    Running: the steps left at this run's own mean step time. Submitted: when a worker is free for
    it (the live workers first finish what they run, then the tasks ahead of it, each at the recent
    mean task duration), plus its own duration (``position``: its queue position, when the caller
    already has it).
    """
    if task.status == Status.RUNNING:
        return _run_seconds_left(task)
    if task.status == Status.SUBMITTED:
        mean_duration = _recently_computed("mean_duration_s", recent_mean_duration_s)
        if mean_duration is None:
            return None
        ahead = (position or queue_position(task=task)) - 1
        running_left = _recently_computed("running_left_s", lambda: _running_seconds_left(mean_duration))
        workers = max(_recently_computed("live_workers", live_worker_count), len(running_left), 1)
        return round(_worker_free_after(running_left, workers, ahead, mean_duration) + mean_duration, 1)
    return None


def _run_seconds_left(task: VideoTask) -> float | None:
    step_s = task.run_stats.get("step_s")
    if step_s is None:
        return None
    steps_left = task.infer_steps * task.num_fragments - task.run_stats.get("steps_done", 0)
    return round(max(steps_left, 0) * step_s, 1)


def _running_seconds_left(mean_duration: float) -> list[float]:
    """What each running task has left (a whole mean duration for one still loading its model)."""
    running = VideoTask.objects.filter(status=Status.RUNNING).only("infer_steps", "num_fragments", "run_stats")
    return [left if (left := _run_seconds_left(task)) is not None else mean_duration for task in running]


SIMULATED_TASKS_AHEAD = 1000


def _worker_free_after(running_left: list[float], workers: int, ahead: int, mean_duration: float) -> float:
    """Seconds until one of ``workers`` is free for the task behind ``ahead`` queued ones, each taken by
    the first worker free; past ``SIMULATED_TASKS_AHEAD`` they are shared out evenly."""
    free_at = sorted(running_left)[:workers] + [0.0] * max(workers - len(running_left), 0)
    heapq.heapify(free_at)
    for _ in range(min(ahead, SIMULATED_TASKS_AHEAD)):
        heapq.heapreplace(free_at, free_at[0] + mean_duration)
    return free_at[0] + max(ahead - SIMULATED_TASKS_AHEAD, 0) * mean_duration / workers
