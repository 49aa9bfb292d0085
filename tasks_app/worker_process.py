"""What one qcluster worker process keeps between tasks: its current run, a heartbeat thread, a shutdown flag.

``start()`` runs in each worker process once django-q2 has spawned it (``post_spawn``), never in
the forking parent. From then on a daemon thread, every ``LIGHTX2V_HEARTBEAT_S``:

* extends the lease of the task this process is running (``services.task_heartbeat``), and
  marks the run lost when the lease is gone (cancelled, or taken back by a reaper); a run still going
  a lease past its time limit is stuck outside the step loop, and the process exits instead;
* reaps tasks of other workers whose lease ran out (``services.task_reap_stale``);
* every ``STRAY_RUN_FILES_SWEEP_S``, removes files of runs that can no longer publish them
  (``sweep_stray_run_files``) and those of tasks past ``LIGHTX2V_RETENTION_DAYS`` (``retention``);
* while idle and warm, queues a wake-up for a task left waiting without a queue message
  (``wakeups.wake_stranded``), and hands the heap freed by the last runs back to the OS.

A second thread sends due webhook deliveries (``webhooks.send_due``): at start, when one is
announced, when a retry falls due, and every ``LIGHTX2V_WEBHOOK_POLL_S`` in any case. On PostgreSQL a
third listens: for cancellations (``wakeups.CANCEL_CHANNEL``), stopping the run at its next step
without waiting for the next progress write or heartbeat, and for deliveries
(``wakeups.WEBHOOK_CHANNEL``), waking the sender.

Shutdown (SIGTERM to this process, or its cluster stopping after SIGTERM to ``qcluster``): an idle
worker stops within a beat (see ``_leave``); a running task may go on for ``LIGHTX2V_SHUTDOWN_GRACE_S``
and is then handed back to the queue at its next step. Database errors in the thread are logged
and the connection is reopened on the next beat: a database restart never kills a worker.
"""
import ctypes
import functools
import logging
import os
import signal
import threading
import time

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django_q.conf import Conf

from . import commits, retention, selectors, services, storage, wakeups, webhooks
from .models import VideoTask

logger = logging.getLogger(__name__)
# After a failed look at the deliveries (database down), the pause before the next.
WEBHOOK_RETRY_S = 1.0
STRAY_RUN_FILES_SWEEP_S = 600.0
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters (malloc.h)


class Run:
    """The task this process is running, as claimed (its ``worker_name`` + ``attempt_count`` are the lease)."""

    def __init__(self, task: VideoTask):
        self.task = task
        self.lease_lost = threading.Event()  # set by the heartbeat or cancel listener; the next step stops the run
        self.deadline: float | None = None  # time.monotonic() limit of the generation, once the model is loaded
        self.progress_written_at = time.monotonic()  # the claim wrote the first progress
        self.progress_writes = 0


_current: Run | None = None
_current_lock = threading.Lock()
_heap_to_release = False  # a run ended since the heap was last trimmed
_shutdown_deadline: float | None = None  # time.monotonic() after which the run is handed back
_webhooks_announced = threading.Event()  # set by the listener thread: a delivery was queued
_next_sweep_at = 0.0  # time.monotonic() of the next sweep_stray_run_files (the first beat sweeps)
_expiry_backlog = False  # the last retention pass had a full batch: more tasks' files are due


def begin(task: VideoTask) -> Run:
    global _current
    with _current_lock:
        _current = Run(task)
        return _current


def end() -> None:
    global _current, _heap_to_release
    with _current_lock:
        _current = None
        _heap_to_release = True


def _keep_freed_heap_between_runs() -> None:
    """Have glibc keep freed memory (up to 1 GiB at the heap top; blocks up to 32 MiB from the heap)
    instead of unmapping it on every free: with its defaults a tiny task faulted 2,000-15,000 pages
    in again, with these about 20. :func:`release_free_heap` still hands it back once idle."""
    mallopt = _glibc_function("mallopt")
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


@functools.cache
def _glibc_function(name: str):
    """glibc's C function ``name``, or None where the C library is not glibc or has no such function."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]


def heap_in_use_bytes() -> int | None:
    """Bytes glibc's allocator has handed out and not had back: allocated chunks over all arenas
    plus mmapped blocks (``mallinfo2``, glibc >= 2.33); None elsewhere. Unlike RSS, it does not
    count the freed heap kept between runs."""
    mallinfo2 = _glibc_function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def release_free_heap() -> None:
    """Hand heap that finished runs freed back to the OS (glibc ``malloc_trim``), once idle.

    Done by the heartbeat, not after each run: the next run would fault those pages in again
    (thousands per tiny task), so back-to-back tasks keep them and an idle worker gives them back.
    """
    global _heap_to_release
    with _current_lock:
        if _current is not None or not _heap_to_release:
            return
        _heap_to_release = False
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def shutdown_overdue() -> bool:
    """True once SIGTERM's grace period is over: the running task should be handed back now."""
    return _shutdown_deadline is not None and time.monotonic() >= _shutdown_deadline


def shutting_down() -> bool:
    return _shutdown_deadline is not None


def _on_sigterm(signum, frame) -> None:
    # Only flags the shutdown: the main thread may be inside a query on the connection a handler
    # would use. An idle worker leaves from the heartbeat thread, within a beat.
    _begin_shutdown("SIGTERM")


def _exit_now() -> None:
    # os._exit works from the heartbeat thread too; an idle worker has nothing to clean up.
    logging.shutdown()
    os._exit(0)


def exit_if_shutting_down() -> None:
    """Called after a run ends: a process told to stop does not take another task."""
    if shutting_down():
        _leave()


def _leave() -> None:
    """Stop this idle, stopping process: exit now, unless its cluster is stopping too.

    A stopping cluster's sentinel puts "STOP" in the task queue for each worker, and that queue
    holds one message (queue_limit 1): one its pusher took meanwhile would stay there with no
    worker left to read it, and the sentinel would wait on the full queue until killed. So such
    a worker goes back to django-q's loop, passes that message on (``run_next_task`` refuses it
    and wakes other workers) and ends at "STOP".
    """
    global _left
    _left = True
    try:
        with_its_cluster = os.getppid() == _sentinel_pid and _cluster_is_stopping(_sentinel_pid)
    except DatabaseError:
        with_its_cluster = False
    if with_its_cluster:
        logger.info("worker %s stops with its cluster", os.getpid())
        return
    logger.info("worker %s exits after SIGTERM", os.getpid())
    _exit_now()


def _beat() -> None:
    with _current_lock:
        run = _current
    if run is not None and run.deadline is not None and time.monotonic() > run.deadline + settings.LIGHTX2V_LEASE_S:
        # A lease past its time limit and still not stopped: the main thread is stuck where no step
        # check runs (a hung kernel, a blocking call). Renewing its lease would keep the task
        # "running" forever; exiting frees the device, and the reaper queues the task again.
        logger.error("worker %s: task %s is stuck past its time limit; exiting", os.getpid(), run.task.pk)
        _exit_now()
    if run is not None and not run.lease_lost.is_set() and not services.task_heartbeat(task=run.task):
        run.lease_lost.set()
    services.task_reap_stale(lease_s=settings.LIGHTX2V_LEASE_S, max_attempts=settings.LIGHTX2V_MAX_ATTEMPTS)
    global _next_sweep_at, _expiry_backlog
    sweep_due = time.monotonic() >= _next_sweep_at
    if sweep_due:
        _next_sweep_at = time.monotonic() + STRAY_RUN_FILES_SWEEP_S
        sweep_stray_run_files()
    if sweep_due or _expiry_backlog:  # a batch a beat while there are more, so the beat stays short
        days = settings.LIGHTX2V_RETENTION_DAYS
        _expiry_backlog = retention.expire_finished_files(days=days) == retention.BATCH
    if run is None and _ready.is_set() and not shutting_down():  # idle: a task still waiting lost its message
        wakeups.wake_stranded(waiting_s=settings.LIGHTX2V_HEARTBEAT_S)


def sweep_stray_run_files() -> int:
    """Remove the unpublished files of runs that no longer hold their task and have not written for a
    lease: their worker died before it could, and no reaper did (the task was cancelled or retried
    first, or it was reaped by a version that left them). Returns how many runs it cleared."""
    stray = storage.runs_with_files(idle_s=settings.LIGHTX2V_LEASE_S)
    stray -= selectors.running_runs(stray)
    for task_id, attempt in stray:
        storage.discard_run_files(task_id, attempt)
    if stray:
        logger.info("removed the files of %d runs that ended without their worker", len(stray))
    return len(stray)


def _cluster_is_stopping(sentinel_pid: int) -> bool:
    """True once this process's cluster is going away: its sentinel died, or reports "Stopping".

    ``qcluster`` on SIGTERM stops its sentinel, which only tells workers "STOP" after their
    current task; this lets the running task know at once, so the grace period applies.
    """
    if os.getppid() != sentinel_pid:
        return True
    return any(stat.sentinel == sentinel_pid and stat.status == Conf.STOPPING for stat in selectors.cluster_stats())


def _begin_shutdown(reason: str) -> None:
    global _shutdown_deadline
    if _shutdown_deadline is None:
        _shutdown_deadline = time.monotonic() + settings.LIGHTX2V_SHUTDOWN_GRACE_S
        logger.info("worker %s shutting down (%s); grace %s s", os.getpid(), reason, settings.LIGHTX2V_SHUTDOWN_GRACE_S)


def _while_shutting_down() -> None:
    """Heartbeat-thread side of a shutdown: an idle worker leaves (once); a run that has not handed
    back a lease length after its grace ended is stuck outside the step loop (a hung kernel, say),
    and the process exits so the lease runs out and the reaper queues the task again."""
    if _current is None and not _left:
        _leave()
    elif _current is not None and time.monotonic() > _shutdown_deadline + settings.LIGHTX2V_LEASE_S:
        logger.error("worker %s: the run did not stop after the grace period; exiting", os.getpid())
        _exit_now()


def _heartbeat_loop(sentinel_pid: int) -> None:
    while True:
        time.sleep(settings.LIGHTX2V_HEARTBEAT_S)
        try:
            close_old_connections()
            if _shutdown_deadline is None and _cluster_is_stopping(sentinel_pid):
                _begin_shutdown("cluster stopping")
            if _shutdown_deadline is not None:
                _while_shutting_down()
            _beat()
            release_free_heap()
        except DatabaseError as exc:
            logger.warning("heartbeat: database unavailable (%s); retrying", exc)
            connection.close()
        except Exception:  # noqa: BLE001 - the heartbeat thread must outlive any single failure
            logger.exception("heartbeat failed")


_started = False
_sentinel_pid = 0
_left = False  # an idle, stopping worker went through _leave (and stayed for its cluster's STOP)
# Set once the pipelines are warm: before that the message for a waiting task may be held for this very
# process (its pusher took it), and a wake-up would only add a message to this cluster's queue.
_ready = threading.Event()


def mark_ready() -> None:
    """This process takes tasks from now on (``post_spawn`` finished warming up)."""
    _ready.set()


def start() -> None:
    """Install the SIGTERM handler and start the heartbeat thread (once per process)."""
    global _started, _sentinel_pid
    if _started:
        return
    _started = True
    _sentinel_pid = os.getppid()
    _keep_freed_heap_between_runs()
    commits.worker_side()
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(
        target=_heartbeat_loop, args=(_sentinel_pid,), name="lightx2v-heartbeat", daemon=True
    ).start()
    threading.Thread(target=_webhook_loop, name="lightx2v-webhooks", daemon=True).start()
    if wakeups.supported():
        threading.Thread(target=_listener_loop, name="lightx2v-listener", daemon=True).start()


def _listener_loop() -> None:
    """Mark the current run lost when its task's cancellation is announced, once the row confirms it;
    wake the webhook sender when a delivery is announced.

    The check against the row (the heartbeat's fenced update) keeps a late notification from
    stopping a later run of the same task.
    """
    listener = None
    while True:
        try:
            if listener is None:
                listener = wakeups.Listener(wakeups.CANCEL_CHANNEL, wakeups.WEBHOOK_CHANNEL)
            received = listener.wait(timeout=settings.LIGHTX2V_HEARTBEAT_S)
            if any(channel == wakeups.WEBHOOK_CHANNEL for channel, _ in received):
                _webhooks_announced.set()
            cancelled = {payload for channel, payload in received if channel == wakeups.CANCEL_CHANNEL}
            with _current_lock:
                run = _current
            if run is not None and str(run.task.pk) in cancelled:
                close_old_connections()
                if not services.task_heartbeat(task=run.task):
                    run.lease_lost.set()
        except Exception as exc:  # noqa: BLE001 - the listener must outlive a database restart
            logger.warning("listener: %s; listening again in %s s", exc, wakeups.RELISTEN_AFTER_S)
            if listener is not None:
                listener.close()
            listener = None
            connection.close()
            time.sleep(wakeups.RELISTEN_AFTER_S)


def _webhook_loop() -> None:
    """Send due webhook deliveries, off the generation thread (a slow receiver delays nothing else).

    Looks at start, when the listener hands on an announcement, when the earliest pending retry falls
    due, and at least every ``LIGHTX2V_WEBHOOK_POLL_S``: an idle worker does not query the database
    for deliveries several times a second.
    """
    wait_s = 0.0
    while True:
        _webhooks_announced.wait(timeout=wait_s)
        _webhooks_announced.clear()  # what was announced before this is committed: send_due sees it
        try:
            close_old_connections()
            webhooks.send_due()
            due_in = webhooks.seconds_until_due()
            wait_s = settings.LIGHTX2V_WEBHOOK_POLL_S
            if due_in is not None:  # a retry falls due sooner
                wait_s = min(due_in, wait_s)
        except DatabaseError as exc:
            logger.warning("webhooks: database unavailable (%s); retrying", exc)
            connection.close()
            wait_s = WEBHOOK_RETRY_S
        except Exception:  # noqa: BLE001 - the sender must outlive any single failure
            logger.exception("webhook sending failed")
            wait_s = WEBHOOK_RETRY_S
