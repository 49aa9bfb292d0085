"""The statements every task passes through as prepared SQL (PostgreSQL): the submit's owner lock and
cap counts, and the two transitions every run makes, claim and finish, as one statement each.

``services`` owns what a submit checks and what a claim and a finish change; this module only runs
the same reads and writes as single statements. The ORM compiled the submit's cap counts alone in
~2 ms on a slow 2-core machine (the statement: ~0.4 ms). In their ORM form the claim is five round
trips (lock the oldest submitted row, mark it running, open its attempt, plus the transaction) and
the finish four, each query compiled afresh: in a worker that had been idle, 3-4 ms each per task; a
statement here is ~0.4 ms. ``services`` uses these on PostgreSQL and its ORM forms elsewhere (SQLite);
tests hold both forms to the same rows.
"""
from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from . import rows, selectors
from .models import TaskAttempt, VideoTask

_TASKS = VideoTask._meta.db_table
_ATTEMPTS = TaskAttempt._meta.db_table
TASK_FIELDS = list(VideoTask._meta.concrete_fields)


def supported() -> bool:
    """Whether the default database runs these statements (PostgreSQL: data-modifying CTEs, SKIP LOCKED)."""
    return connection.vendor == "postgresql"


_OWNERS = get_user_model()._meta.db_table
_LOCK_OWNER = f'SELECT 1 FROM "{_OWNERS}" WHERE "{get_user_model()._meta.pk.column}" = %s FOR UPDATE'
_UNFINISHED_COUNTS = (
    f'SELECT count(*) FILTER (WHERE "{VideoTask._meta.get_field("owner").column}" = %(owner)s),'
    f' count(*) FILTER (WHERE "status" = %(submitted)s) FROM "{_TASKS}" WHERE "status" IN (%(submitted)s, %(running)s)'
)


def lock_owner(*, owner_id) -> None:
    """Lock the owner's row until the transaction ends (one owner's submits run one at a time)."""
    rows.plain_rows(_LOCK_OWNER, [owner_id])


def unfinished_counts(*, owner_id) -> tuple[int, int]:
    """(the owner's submitted + running tasks, all submitted tasks), read in a fresh statement
    snapshot: run it after ``lock_owner``, so it sees what the owner's previous submit committed."""
    params = {"owner": owner_id, "submitted": VideoTask.Status.SUBMITTED, "running": VideoTask.Status.RUNNING}
    return tuple(rows.plain_rows(_UNFINISHED_COUNTS, params)[0])


# The first submitted row in the claim order (selectors.TURNS_SQL: fair between users) that no other
# claim holds, marked running at the database's time; its attempt opened; the row returned.
_CLAIM = f"""
WITH {selectors.TURNS_SQL.replace("%s", "%(running)s", 1).replace("%s", "%(submitted)s", 1)}, picked AS (
    -- In claim order, each row locked only when reached: a join the planner might reorder would lock
    -- (or, with stale statistics, scan) every queued row for each claim (240 ms at 1000 queued).
    SELECT free."task_id" FROM (SELECT "task_id" FROM turns ORDER BY {selectors.TURN_ORDER}) AS next_up
    CROSS JOIN LATERAL (
        SELECT t."task_id" FROM "{_TASKS}" t WHERE t."task_id" = next_up."task_id" AND t."status" = %(submitted)s
        FOR UPDATE SKIP LOCKED
    ) AS free
    LIMIT 1
), claimed AS (
    UPDATE "{_TASKS}" SET "status" = %(running)s, "started_at" = statement_timestamp(),
        "heartbeat_at" = statement_timestamp(),
        "attempt_count" = "{_TASKS}"."attempt_count" + 1, "worker_name" = %(worker_name)s,
        "message" = %(message)s, "run_stats" = '{{}}'::jsonb
    FROM picked WHERE "{_TASKS}"."task_id" = picked."task_id" AND "{_TASKS}"."status" = %(submitted)s
    RETURNING {rows.columns(*TASK_FIELDS)}
), opened AS (
    INSERT INTO "{_ATTEMPTS}" ("task_id", "number", "worker_name", "started_at", "outcome", "error")
    SELECT "task_id", "attempt_count", %(worker_name)s, "started_at", %(attempt_running)s, '' FROM claimed
)
SELECT * FROM claimed
"""


def claim_next(*, worker_name: str, message: str) -> VideoTask | None:
    """Claim the next submitted task for ``worker_name`` (see ``services.task_claim_next``); None if none.

    Its start and first heartbeat are the database's time, like every later heartbeat: leases never
    compare two hosts' clocks."""
    found = rows.converted_rows(
        _CLAIM,
        {
            "submitted": VideoTask.Status.SUBMITTED,
            "running": VideoTask.Status.RUNNING,
            "attempt_running": TaskAttempt.Outcome.RUNNING,
            "worker_name": worker_name,
            "message": message,
        },
        TASK_FIELDS,
    )
    return rows.instance(VideoTask, TASK_FIELDS, found[0]) if found else None


def _finish_sql(changes: list[str]) -> str:
    assignments = ", ".join(f'"{VideoTask._meta.get_field(name).column}" = %(set_{name})s' for name in changes)
    return f"""
WITH finished AS (
    UPDATE "{_TASKS}" SET {assignments}
    WHERE "task_id" = %(task_id)s AND "status" = %(running)s
        AND "worker_name" = %(lease_worker)s AND "attempt_count" = %(lease_attempt)s
    RETURNING "task_id"
), ended AS (
    UPDATE "{_ATTEMPTS}"
    SET "outcome" = %(outcome)s, "error" = %(attempt_error)s, "finished_at" = %(attempt_finished_at)s
    WHERE "task_id" IN (SELECT "task_id" FROM finished) AND "number" = %(lease_attempt)s AND "finished_at" IS NULL
)
SELECT "task_id" FROM finished
"""


_finish_sql_by_changes: dict[tuple[str, ...], str] = {}


def finish_run(*, task: VideoTask, changes: dict[str, Any], outcome: str, attempt_error: str = "") -> bool:
    """Apply ``changes`` (field name -> value) to ``task``'s row while its run still holds it (the lease
    ``task`` was claimed with), and close that run's attempt with ``outcome``, ``attempt_error`` and
    the row's new ``finished_at`` (now if it gets none); False, nothing changed, if the run lost it."""
    names = tuple(sorted(changes))
    sql = _finish_sql_by_changes.get(names)
    if sql is None:
        sql = _finish_sql_by_changes[names] = _finish_sql(list(names))
    params = {
        f"set_{name}": VideoTask._meta.get_field(name).get_db_prep_save(value, connection)
        for name, value in changes.items()
    }
    params.update(
        task_id=task.pk,
        running=VideoTask.Status.RUNNING,
        lease_worker=task.worker_name,
        lease_attempt=task.attempt_count,
        outcome=outcome,
        attempt_error=attempt_error,
        attempt_finished_at=changes.get("finished_at") or timezone.now(),
    )
    return bool(rows.converted_rows(sql, params, [VideoTask._meta.pk]))
