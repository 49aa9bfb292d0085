"""The django-q2 worker entry: claim the oldest submitted task, generate its video, record the outcome.

A django-q2 message only says "there is work": ``run_next_task`` claims whichever submitted row is
oldest, so a duplicated message finds nothing to do and a lost one is covered by the next. The
pipeline is loaded lazily inside the worker process (never in the forking parent) and cached by
``inference.pipelines`` for every later task of that process.
"""
import hashlib
import logging
import os
import socket
import sys
import time
import traceback

import numpy as np
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django_q.exceptions import TimeoutException

from inference.encode import BackgroundMp4Writer, Mp4Writer, write_poster
from inference.generate import (
    FPS,
    GenerationRequest,
    frames_for_duration,
    generate_frames,
    continuation_request,
    warm_up,
)
from inference.pipelines import applied_options, load_count, load_pipeline, resolve_device

from . import services, storage, wakeups, worker_process

logger = logging.getLogger(__name__)
# Errors of a database that could not be reached (dropped connection, server restarting), not of a query.
DATABASE_UNREACHABLE = (OperationalError, InterfaceError)

DENOISE_SHARE = 0.9  # progress given to denoising; decode and encode take the rest
ENCODE_PROGRESS = 0.95
WARM_UP_SIZE = (480, 832)  # the API's default height and width
MODEL_PATH_SETTINGS = {"t2v": "LIGHTX2V_MODEL_PATH", "i2v": "LIGHTX2V_I2V_MODEL_PATH"}


class TaskTimedOut(Exception):
    """The run passed ``LIGHTX2V_TASK_TIMEOUT``."""


class HandBack(Exception):
    """The worker was told to stop and the grace period is over: the task goes back to the queue."""


def on_worker_spawn(**signal_kwargs) -> None:
    """django-q2 ``post_spawn``: runs in each new worker process before it takes a task."""
    worker_process.start()
    warm_up_pipelines()
    worker_process.mark_ready()


def warm_up_pipelines() -> None:
    """Load (and with ``full``, run one step of) each configured pipeline, per ``LIGHTX2V_WARM_UP``.

    A model that fails to load is only logged here; the first task of that kind fails with the reason.
    """
    mode = settings.LIGHTX2V_WARM_UP
    if mode == "auto":
        mode = "full" if resolve_device(settings.LIGHTX2V_DEVICE)[0].type == "cuda" else "load"
    if mode == "off":
        return
    for kind, setting in MODEL_PATH_SETTINGS.items():
        if not getattr(settings, setting):
            continue
        started = time.perf_counter()
        try:
            pipe = load_configured_pipeline(kind)
            if mode == "full":
                warm_up(pipe, height=WARM_UP_SIZE[0], width=WARM_UP_SIZE[1], num_frames=frames_for_duration(5))
        except Exception:  # noqa: BLE001 - a broken model must not keep the worker from starting
            logger.exception("warm-up of the %s pipeline failed", kind)
            continue
        logger.info("warmed up %s pipeline (%s) in %.1f s", kind, mode, time.perf_counter() - started)


def stream_encode() -> bool:
    """Whether the MP4 is encoded during the decode (``LIGHTX2V_STREAM_ENCODE``; auto: off on the CPU)."""
    if settings.LIGHTX2V_STREAM_ENCODE == "auto":
        return resolve_device(settings.LIGHTX2V_DEVICE)[0].type != "cpu"
    return settings.LIGHTX2V_STREAM_ENCODE == "on"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_next_task() -> str | None:
    """Claim and run one submitted task; returns its id, or None when the queue was empty."""
    if worker_process.shutting_down():
        # A stopping worker takes nothing new. Its pusher took this message before the stop: put
        # a wake-up back in the broker for other workers (the task waits in the table either way).
        wakeups.wake_stranded(waiting_s=0)
        return None
    # A claim that failed on a database error would use up this message with nothing claimed (its
    # acknowledgement fails too, so the broker holds it back for the retry period): wait for the database.
    task = _with_database_retry(lambda: services.task_claim_next(worker_name=worker_name()))
    if task is None:
        return None
    logger.info("task %s claimed by %s (attempt %d)", task.task_id, task.worker_name, task.attempt_count)
    run = worker_process.begin(task)
    try:
        execute_task(run)
    finally:
        worker_process.end()
        worker_process.exit_if_shutting_down()
    return str(task.task_id)


def execute_task(run: worker_process.Run) -> None:
    """Run a claimed task to ``succeed`` or ``failed``, hand it back on shutdown, stop quietly once cancelled."""
    task = run.task
    run_stats: dict = {"worker": task.worker_name, "attempt": task.attempt_count}
    try:
        with storage.output_files(task.task_id, task.attempt_count) as output:
            streaming = stream_encode()  # encoded on its own thread while the VAE decodes the next frames
            with (BackgroundMp4Writer if streaming else Mp4Writer)(output.video, fps=FPS) as video:
                frames = _generate(run, run_stats, on_frames=_unless_stopped(run, video.write) if streaming else None)
                _report(run, ENCODE_PROGRESS, "encoding", time_limited=False)  # the frames are done: keep them
                started = time.perf_counter()
                if not streaming:
                    video.write(frames)
                video.close()
            write_poster(frames, output.poster)
            video_info = video.metadata()
            run_stats["encode_s"] = round(time.perf_counter() - started, 3)  # what encoding adds after the decode
            run_stats["memory_mib"] = memory_in_use_mib()
            run_stats["progress_writes"] = run.progress_writes  # besides the claim and this finish
            finished = _with_database_retry(
                lambda: services.task_finish(
                    task=task, file_path=output.video_path, poster_path=output.poster_path, video_info=video_info,
                    run_stats=run_stats, publish=output.publish,
                )  # fmt: skip
            )
            if not finished:  # cancelled (or taken back) while encoding: this run's files are discarded
                raise services.TaskNoLongerRunning(str(task.task_id))
        logger.info("task %s succeeded: %s", task.task_id, run_stats)
    except services.TaskNoLongerRunning:
        logger.info("task %s stopped: no longer ours (cancelled or lease lost)", task.task_id)
        services.task_record_run_stats(task=task, run_stats=run_stats)
    except HandBack:
        logger.info("task %s handed back: worker shutting down", task.task_id)
        _with_database_retry(lambda: services.task_hand_back(task=task, reason="worker shut down"))
    except DATABASE_UNREACHABLE as exc:
        # The final write (or the failure's) waited a lease for the database in vain. The task is not
        # at fault: its lease runs out now and a reaper queues it again, instead of failing a finished video.
        logger.error("task %s left to the reaper: database unreachable for a lease (%s)", task.task_id, exc)
    except (TaskTimedOut, TimeoutException):
        limit = settings.LIGHTX2V_TASK_TIMEOUT
        _with_database_retry(
            lambda: services.task_fail(
                task=task, error=f"timed out after {limit} s", run_stats=run_stats, timed_out=True
            )
        )
    except Exception as exc:  # noqa: BLE001 - any failure of a run is recorded on the task
        logger.exception("task %s failed", task.task_id)
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        _with_database_retry(lambda: services.task_fail(task=task, error=error, run_stats=run_stats))


def _with_database_retry(write, *, patience_s: float | None = None):
    """Run a final state write, retrying while the database is unreachable (up to the lease length).

    Past that the lease has run out anyway and a reaper will take the task back.
    """
    deadline = time.monotonic() + (settings.LIGHTX2V_LEASE_S if patience_s is None else patience_s)
    while True:
        try:
            return write()
        except DATABASE_UNREACHABLE as exc:
            connection.close()
            if time.monotonic() >= deadline:
                raise
            logger.warning("database unavailable (%s); retrying the claim or final write in 1 s", exc)
            time.sleep(1.0)


def _report(
    run: worker_process.Run, progress: float, message: str, run_stats: dict | None = None, *, time_limited: bool = True
) -> None:
    """Record progress (at most every ``LIGHTX2V_PROGRESS_INTERVAL_S``), and stop the run when it is
    no longer ours, overdue on shutdown, or (when ``time_limited``) out of time.

    A failed progress write (database down) is logged and skipped: it never stops a generation.
    """
    if run.lease_lost.is_set():
        raise services.TaskNoLongerRunning(str(run.task.pk))
    now = time.monotonic()
    if now - run.progress_written_at >= settings.LIGHTX2V_PROGRESS_INTERVAL_S:
        run.progress_written_at = now
        run.progress_writes += 1
        try:
            services.task_report_progress(task=run.task, progress=progress, message=message, run_stats=run_stats)
        except DatabaseError as exc:
            logger.warning("progress of task %s not recorded: %s", run.task.pk, exc)
            connection.close()
    if worker_process.shutdown_overdue():
        raise HandBack()
    if time_limited and run.deadline is not None and time.monotonic() > run.deadline:
        raise TaskTimedOut()


def _unless_stopped(run: worker_process.Run, on_frames):
    """``on_frames`` that first stops the run once it is no longer ours: a cancel during the decode."""

    def hand_on(chunk: np.ndarray) -> None:
        if run.lease_lost.is_set():
            raise services.TaskNoLongerRunning(str(run.task.pk))
        on_frames(chunk)

    return hand_on


def _generate(run: worker_process.Run, run_stats: dict, on_frames) -> np.ndarray:
    """Denoise and decode every fragment; later fragments continue from the previous last frame.

    Returns the joined video; ``on_frames`` (if given) receives the same frames in chunks as they are decoded.

    ``run_stats["fragments"]`` gets, per fragment, the SHA-256 of its conditioning image and of its
    last frame, so the seams can be checked from outside.
    """
    task = run.task
    request = _first_request(task)
    joined: list[np.ndarray] = []
    run_stats["fragments"] = []
    for index in range(task.num_fragments):
        pipe = _pipeline(request.kind, run_stats)
        if index == 0:
            # The time limit covers generation, not a model's first load.
            run.deadline = time.monotonic() + settings.LIGHTX2V_TASK_TIMEOUT
        calls_before = transformer_calls(pipe)
        started = time.perf_counter()
        frames = generate_frames(
            pipe,
            request,
            on_step=_progress_reporter(run, index, run_stats),
            lora_dir=settings.LIGHTX2V_LORA_DIR,
            on_frames=on_frames if index == 0 or on_frames is None else _without_seam_frame(on_frames),
        )
        run_stats["denoise_decode_s"] = round(run_stats.get("denoise_decode_s", 0) + time.perf_counter() - started, 3)
        run_stats["fragments"].append(
            {
                "input_sha256": _sha256(np.asarray(request.image)) if request.image is not None else None,
                "last_frame_sha256": _sha256(frames[-1]),
                "transformer_calls": transformer_calls(pipe) - calls_before,
            }
        )
        # The first frame of a continuation repeats the seam frame it was conditioned on.
        joined.append(frames if index == 0 else frames[1:])
        request = continuation_request(request, frames)
    return np.concatenate(joined, axis=0)


def _without_seam_frame(on_frames):
    """``on_frames`` for a continuation: its first frame repeats the seam frame, already handed on."""
    seen = [0]

    def hand_on(chunk: np.ndarray) -> None:
        skip = 1 if seen[0] == 0 else 0
        seen[0] += len(chunk)
        if len(chunk) > skip:
            on_frames(chunk[skip:])

    return hand_on


def _first_request(task) -> GenerationRequest:
    image = storage.open_input_image(task.input_image) if task.input_image else None
    return GenerationRequest(
        prompt=task.prompt,
        negative_prompt=task.negative_prompt,
        image=image,
        infer_steps=task.infer_steps,
        num_frames=frames_for_duration(task.video_duration),
        height=task.height,
        width=task.width,
        seed=task.seed,
        guidance_scale=task.guidance_scale,
        sample_shift=task.sample_shift,
        scheduler=settings.LIGHTX2V_SCHEDULER or None,
        # An adaptive size was fitted to the image at submit (task.height/width); here the image is
        # only brought to that size, which keeps its aspect ratio.
        resize_mode="fixed_shape",
        lora_name=task.lora_name or None,
        lora_strength=task.lora_strength,
        step_cache=task.step_cache,
    )


def _sha256(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def transformer_calls(pipe) -> int:
    """How many forward passes ``pipe``'s transformer has run (a counter hooked in on first use)."""
    transformer = pipe.transformer
    if not hasattr(transformer, "_lightx2v_calls"):
        transformer._lightx2v_calls = 0

        def count(module, args):
            module._lightx2v_calls += 1

        transformer.register_forward_pre_hook(count)
    return transformer._lightx2v_calls


def memory_in_use_mib() -> dict[str, float]:
    """Memory this process holds, in MiB, read at the end of a run: to show nothing leaks.

    ``rss`` is resident memory. It includes heap the run freed but the allocator keeps for the next
    run (``worker_process._keep_freed_heap_between_runs``), so it grows in rare allocator steps even
    without a leak; an idle worker hands that back (``worker_process.release_free_heap``).
    ``heap_in_use`` (glibc only) is what C allocations, tensors included, still hold: flat from run
    to run unless something leaks. ``cuda_allocated`` (CUDA only) is memory held by tensors.
    """
    page_size = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        usage = {"rss": round(int(statm.read().split()[1]) * page_size / 2**20, 1)}
    heap = worker_process.heap_in_use_bytes()
    if heap is not None:
        usage["heap_in_use"] = round(heap / 2**20, 1)
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        usage["cuda_allocated"] = round(sys.modules["torch"].cuda.memory_allocated() / 2**20, 1)
    return usage


def _model_path(kind: str) -> str:
    model_path = getattr(settings, MODEL_PATH_SETTINGS[kind])
    if not model_path:
        raise RuntimeError(f"no {kind} model configured ({MODEL_PATH_SETTINGS[kind]} is empty)")
    return model_path


def load_configured_pipeline(kind: str):
    """The cached pipeline of ``kind`` with the configured device and speed options (loaded on first use)."""
    return load_pipeline(
        _model_path(kind), kind=kind, device=settings.LIGHTX2V_DEVICE, options=settings.LIGHTX2V_INFERENCE_OPTIONS
    )


def _pipeline(kind: str, run_stats: dict):
    started = time.perf_counter()
    pipe = load_configured_pipeline(kind)
    run_stats.setdefault("load_s", round(time.perf_counter() - started, 3))
    # How many times this process has loaded a pipeline so far: stays flat once the cache is warm.
    run_stats["pipeline_loads"] = load_count()
    run_stats.setdefault("options", applied_options(pipe))
    return pipe


def _progress_reporter(run: worker_process.Run, fragment_index: int, run_stats: dict):
    """A step callback that records progress and stops the run as ``_report`` decides."""
    fragments = run.task.num_fragments
    previous_step_at = [time.perf_counter()]

    def on_step(step: int, total: int) -> None:
        now = time.perf_counter()
        run_stats["denoise_s"] = run_stats.get("denoise_s", 0.0) + now - previous_step_at[0]
        run_stats["steps_done"] = run_stats.get("steps_done", 0) + 1
        # Mean seconds per denoising step (the first includes the prompt encode): the ETA's basis.
        run_stats["step_s"] = round(run_stats["denoise_s"] / run_stats["steps_done"], 4)
        previous_step_at[0] = now
        run_stats["last_step"] = step
        done = (fragment_index + step / total) / fragments
        where = f"step {step}/{total}"
        if fragments > 1:
            where = f"fragment {fragment_index + 1}/{fragments}, {where}"
        _report(run, DENOISE_SHARE * done, where, run_stats)

    return on_step
