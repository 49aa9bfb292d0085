"""Wan2.1 video generation core: load pipelines, generate frames (LoRA, sampling, image fit), encode MP4.

Plain Python, no Django. Public names are re-exported lazily so that importing this
package (e.g. from a web process) does not import torch, diffusers or PyAV.
"""

from __future__ import annotations

import importlib
from typing import Any

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
