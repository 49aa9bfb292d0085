"""Wan2.1 video generation core: load pipelines, generate frames (LoRA, sampling, image fit), encode MP4.

Plain Python, no Django. Public names are re-exported lazily so that importing this
package (e.g. from a web process) does not import torch, diffusers or PyAV.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# libgomp (torch's OpenMP on Linux) keeps each idle thread spinning for GOMP_SPINCOUNT iterations
# after every parallel region: its default of 300,000 spins (~10 ms where PAUSE is slow) kept a core
# busy after each generation, under the MP4 encode and the database writes that follow it (tiny
# task, 2 cores: encode 8-9 ms -> 6 ms, its CPU 14 ms -> 6 ms; generation time unchanged).
# libgomp reads it when it loads, so it takes effect when this package is imported before torch;
# an operator's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

_EXPORTS = {
    "InferenceOptions": "options",
    "ModelLoadError": "pipelines",
    "applied_options": "pipelines",
    "clear_pipeline_cache": "pipelines",
    "load_count": "pipelines",
    "load_pipeline": "pipelines",
    "resolve_device": "pipelines",
    "FPS": "generate",
    "GenerationRequest": "generate",
    "continuation_request": "generate",
    "frames_for_duration": "generate",
    "generate_frames": "generate",
    "last_frame_image": "generate",
    "warm_up": "generate",
    "encode_mp4": "encode",
    "probe_mp4": "encode",
    "video_metadata": "encode",
    "write_poster": "encode",
    "RESIZE_MODES": "images",
    "fit_size": "images",
    "prepare_image": "images",
    "LoraError": "lora",
    "apply_lora": "lora",
    "list_loras": "lora",
    "lora_load_count": "lora",
    "resolve_lora_file": "lora",
    "unload_loras": "lora",
    "SCHEDULERS": "sampling",
    "default_shift": "sampling",
    "pipe_lock": "pipelines",
    "build_tiny_lora": "tiny",
    "build_tiny_models": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
