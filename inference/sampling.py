"""Per-request sampling: flow shift and scheduler, without changing the cached pipeline.

Names in :data:`SCHEDULERS`:

``unipc``: ``UniPCMultistepScheduler`` with flow sigmas (``flow_prediction``,
    ``use_flow_sigmas=True``, ``flow_shift=shift``) — what the Wan2.1 diffusers checkpoints ship.
``euler``: ``FlowMatchEulerDiscreteScheduler(shift=shift)`` — first-order flow matching, the
    kind of sampler LightX2V's 4-step distilled models are run with.

The shift moves the sampling schedule towards high noise (``sigma' = s·σ / (1 + (s−1)·σ)``);
larger videos need more. Importing this module is cheap: diffusers loads on first use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

SCHEDULERS = ("unipc", "euler")
# diffusers' Wan docs: flow_shift 3.0 for 480p, 5.0 for 720p; LightX2V's 4-step distilled
# configs use sample_shift 5 at every size.
SHIFT_480P = 3.0
SHIFT_720P = 5.0
SHIFT_DISTILLED = 5.0
AREA_480P = 480 * 832


def check_sampling(scheduler: str | None, sample_shift: float | None) -> None:
    """Raise ``ValueError`` unless ``scheduler`` is None or in :data:`SCHEDULERS` and
    ``sample_shift`` is None or a finite number > 0."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    if sample_shift is not None and (
        isinstance(sample_shift, bool) or not isinstance(sample_shift, (int, float))
        or not math.isfinite(sample_shift) or sample_shift <= 0
    ):
        raise ValueError(f"sample_shift must be a finite number > 0, got {sample_shift!r}")


def default_shift(height: int, width: int, *, distilled: bool = False) -> float:
    """The flow shift a server should use when a request gives none.

    ``distilled`` (a 4-step step-distilled model or LoRA, e.g. LightX2V's): 5.0. Otherwise
    by area: up to 480×832 pixels 3.0, above (towards 720×1280) 5.0.
    """
    if distilled:
        return SHIFT_DISTILLED
    return SHIFT_480P if height * width <= AREA_480P else SHIFT_720P


def scheduler_name(scheduler) -> str | None:
    """The :data:`SCHEDULERS` name of a scheduler instance, or None for other kinds."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if isinstance(scheduler, UniPCMultistepScheduler):
        return "unipc"
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "euler"
    return None


def configured_shift(scheduler) -> float | None:
    """The flow shift ``scheduler`` is configured with, or None if it has none."""
    name = scheduler_name(scheduler)
    if name == "unipc":
        return float(scheduler.config.flow_shift) if scheduler.config.get("use_flow_sigmas") else None
    if name == "euler":
        return float(scheduler.config.shift)
    return None


def make_scheduler(base, name: str | None, shift: float | None):
    """A new scheduler of kind ``name`` (None: ``base``'s kind) with flow ``shift``.

    ``shift`` None keeps ``base``'s configured shift (:data:`SHIFT_480P` if it has none).
    Settings of ``base`` that the new kind shares (e.g. ``num_train_timesteps``) carry over;
    ``base`` itself is not changed. ``ValueError`` for an unknown ``name``, or ``name`` None
    with a ``base`` that is neither kind.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    check_sampling(name, shift)
    base_name = scheduler_name(base)
    name = name or base_name
    if name is None:
        raise ValueError(f"cannot set the shift of a {type(base).__name__}; choose one of {SCHEDULERS}")
    if shift is None:
        shift = configured_shift(base) or SHIFT_480P
    num_train_timesteps = base.config.get("num_train_timesteps", 1000)
    if name == "unipc":
        flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=float(shift))
        if base_name == "unipc":
            return UniPCMultistepScheduler.from_config(base.config, **flow)
        return UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, **flow)
    if base_name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base.config, shift=float(shift))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))


@contextlib.contextmanager
def scheduler_applied(pipe, name: str | None, shift: float | None) -> Iterator[None]:
    """Run the body with a per-request scheduler on ``pipe``; put the original back after.

    ``name`` and ``shift`` both None: the pipeline's own scheduler is used untouched (the
    frames of a plain call). Otherwise a scheduler from :func:`make_scheduler` replaces
    ``pipe.scheduler`` for the body only, however it ends. Hold ``pipe``'s lock around it.
    """
    if name is None and shift is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(original, name, shift)
    try:
        yield
    finally:
        pipe.scheduler = original  # also restores the scheduler entry of pipe.config
