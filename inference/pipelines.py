"""Load Wan2.1 diffusers pipelines once per process and keep them cached.

Nothing here touches CUDA (or even imports diffusers) until :func:`load_pipeline` runs,
so importing this module is cheap and safe in processes that never generate video.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import time
import types
import weakref
from typing import Any

import torch

from .options import InferenceOptions

logger = logging.getLogger(__name__)

# kind -> diffusers pipeline class name, as written in model_index.json "_class_name".
PIPELINE_CLASS_NAMES: dict[str, str] = {
    "t2v": "WanPipeline",
    "i2v": "WanImageToVideoPipeline",
}

_cache: dict[tuple[str, str, str, InferenceOptions], Any] = {}
# pipe -> what apply_options chose for it (weak: dropping a pipe drops its entry).
_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_load_count = 0
# Held across the whole load so two threads asking for the same model load it once.
_lock = threading.Lock()
# pipe -> the lock that serialises its runs and per-request state changes (see pipe_lock).
_pipe_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_pipe_locks_guard = threading.Lock()


class ModelLoadError(Exception):
    """A model directory is missing, is not the expected Wan pipeline, or failed to load."""


def resolve_device(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Map a device preference to ``(device, dtype)``.

    ``"auto"``: CUDA with bfloat16 when available, else CPU with float32.
    ``"cpu"``: CPU/float32. ``"cuda"`` or ``"cuda:N"``: that device with bfloat16 (its
    availability is not checked here). Anything else raises ``ValueError``.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), torch.bfloat16
        return torch.device("cpu"), torch.float32
    if preference == "cpu":
        return torch.device("cpu"), torch.float32
    if isinstance(preference, str) and (preference == "cuda" or preference.startswith("cuda:")):
        try:
            device = torch.device(preference)
        except RuntimeError as exc:
            raise ValueError(f"invalid CUDA device {preference!r}") from exc
        return device, torch.bfloat16
    raise ValueError(f"unknown device preference {preference!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def load_count() -> int:
    """How many times a pipeline was actually loaded from disk in this process."""
    return _load_count


def applied_options(pipe) -> dict[str, str]:
    """What :func:`load_pipeline` applied to ``pipe``, ``auto`` resolved (see ``fastpath.apply_options``).

    Empty for pipelines that ``load_pipeline`` did not build.
    """
    return dict(_applied.get(pipe, {}))


def pipe_lock(pipe) -> threading.RLock:
    """The re-entrant lock that every run and LoRA/scheduler switch of ``pipe`` holds.

    A cached pipeline is shared by every caller in the process, and a run temporarily
    swaps its scheduler and LoRA adapters; holding this lock keeps two threads from seeing
    each other's choices. One lock per pipeline object, created on first use.
    """
    with _pipe_locks_guard:
        lock = _pipe_locks.get(pipe)
        if lock is None:
            lock = _pipe_locks[pipe] = threading.RLock()
        return lock


def clear_pipeline_cache() -> None:
    """Drop every cached pipeline (``load_count`` is not reset)."""
    with _lock:
        _cache.clear()


def patch_wan_i2v_without_ftfy() -> None:
    """Let ``WanImageToVideoPipeline`` run when the optional ``ftfy`` package is missing.

    diffusers 0.42.1's I2V module calls ``ftfy.fix_text`` without the availability guard its
    T2V twin has (diffusers PR #12314), so every I2V call dies with ``NameError``. This gives
    it the T2V behaviour (skip the fix). Idempotent; does nothing when ftfy is installed.
    """
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def _check_model_dir(path: pathlib.Path, kind: str) -> None:
    """Raise ModelLoadError unless ``path`` is a diffusers directory of the ``kind`` pipeline."""
    expected = PIPELINE_CLASS_NAMES[kind]
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    index_file = path / "model_index.json"
    try:
        class_name = json.loads(index_file.read_text())["_class_name"]
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a diffusers pipeline (no model_index.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {index_file}: {exc}") from exc
    if class_name != expected:
        raise ModelLoadError(f"{path} holds a {class_name}, expected {expected} for kind {kind!r}")


def load_pipeline(
    model_path: str | os.PathLike,
    *,
    kind: str,
    device: str = "auto",
    options: InferenceOptions | None = None,
):
    """Return the ``kind`` Wan pipeline at ``model_path`` on ``device``, loading it at most once.

    ``kind`` is ``"t2v"`` (``diffusers.WanPipeline``) or ``"i2v"``
    (``diffusers.WanImageToVideoPipeline``). The pipeline is loaded in the dtype that
    :func:`resolve_device` picks, except the VAE, which is read straight into
    ``options.vae_dtype`` (a float32 checkpoint's VAE keeps its exact weights); it is moved to
    the device, has its progress bar disabled, gets ``options`` applied (default:
    ``InferenceOptions()``; see :func:`applied_options`) and a prompt-embedding cache of
    ``options.text_cache_size``. Later calls with the same resolved path, kind, device and
    options return the same object; different options load another copy.
    Raises ``ModelLoadError`` (naming the path) when the directory is missing, holds another
    pipeline class, fails to load, CUDA is requested but unavailable, or an explicit option
    cannot run on the device; ``ValueError`` for an unknown ``kind`` or ``device``.
    """
    global _load_count
    if kind not in PIPELINE_CLASS_NAMES:
        raise ValueError(f"unknown pipeline kind {kind!r}; use one of {sorted(PIPELINE_CLASS_NAMES)}")
    options = options if options is not None else InferenceOptions()
    torch_device, dtype = resolve_device(device)
    path = pathlib.Path(model_path).expanduser().resolve()
    key = (str(path), kind, str(torch_device), options)

    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached

        _check_model_dir(path, kind)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            # Fail before a multi-minute load that would end in a failed .to().
            raise ModelLoadError(f"cannot load {path} on {torch_device}: CUDA is not available")

        import diffusers

        from .fastpath import OptionNotUsable, apply_options, component_dtypes

        if kind == "i2v":
            patch_wan_i2v_without_ftfy()
        pipeline_class = getattr(diffusers, PIPELINE_CLASS_NAMES[kind])
        started = time.monotonic()
        try:
            pipe = pipeline_class.from_pretrained(path, dtype=component_dtypes(dtype, options, torch_device))
        except Exception as exc:
            raise ModelLoadError(f"failed to load {kind} pipeline from {path}: {exc}") from exc
        _load_count += 1
        pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        try:
            applied = apply_options(pipe, options, torch_device)
        except OptionNotUsable as exc:
            raise ModelLoadError(f"cannot apply inference options to {path} on {torch_device}: {exc}") from exc
        _applied[pipe] = applied
        _cache[key] = pipe
        logger.info(
            "loaded %s pipeline from %s on %s (%s) in %.1f s with %s",
            kind, path, torch_device, dtype, time.monotonic() - started, applied,
        )
        return pipe
