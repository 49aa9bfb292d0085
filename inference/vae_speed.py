"""A faster decode for diffusers' Wan2.1 VAE (``AutoencoderKLWan``): the same function, fewer passes
over memory.

:func:`speed_up_decoder` changes one loaded VAE in place (its own modules' ``forward``; diffusers'
classes are left alone), and each change is exact up to float rounding:

- ``channels_last``: convolution weights in channels-last layouts, so cuDNN runs its NDHWC kernels
  and the activations stay channels-last (no layout transposes around each convolution).
- ``lean_ops``: a causal convolution pads space inside the convolution instead of copying its
  input into a padded tensor first, and the RMS norm takes three passes over its input instead of
  five (diffusers normalises, then multiplies by the scale, by gamma and adds a zero bias, each a
  pass of its own).

On an H200 (480x832x81) these took the float32 decode from 2.79 to 2.27 s and the bfloat16 one from
1.84 to 1.28 s (bench/README.md). Encoding (I2V) goes through the same changed modules.

:func:`fall_back_to_float32_on_overflow` makes a float16 VAE safe to use: float16 has the mantissa
of the TF32 convolutions a float32 VAE runs on a GPU, but its range ends at 65504.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NORM_EPS = 1e-12  # F.normalize's: x / max(norm, eps)


def speed_up_decoder(vae, *, channels_last: bool = True, lean_ops: bool = True) -> None:
    """Apply the chosen changes to ``vae`` (an ``AutoencoderKLWan``). Decoding and encoding
    afterwards give what the stock code gives, within float rounding; tiled decoding
    (``vae.enable_tiling()``) keeps working and uses the same changed modules."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

    for module in vae.modules():
        if channels_last and isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d)
        elif channels_last and isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
        if lean_ops and isinstance(module, WanCausalConv3d):
            module.forward = types.MethodType(_causal_conv_forward, module)
        elif lean_ops and isinstance(module, WanRMS_norm):
            module.forward = types.MethodType(_rms_norm_forward, module)


def _causal_conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with the spatial zero padding done by the convolution: only the
    causal past (cached frames, else zeros) is joined to ``x`` in time."""
    width_pad, _, height_pad, _, time_pad, _ = self._padding
    if cache_x is not None and time_pad > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        time_pad -= cache_x.shape[2]
    if time_pad > 0:
        x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
    return F.conv3d(x, self.weight, self.bias, self.stride, (0, height_pad, width_pad), self.dilation, self.groups)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``WanRMS_norm.forward`` (``F.normalize`` over channels, times scale and gamma, plus bias) in
    three passes: the norm (accumulated in float32), one multiply by scale / norm, one by gamma in
    place. scale / norm is capped at ``x.dtype``'s largest value: float16 cannot hold scale / eps,
    and an all-zero position stays zero instead of becoming 0 * inf = NaN (the cap changes a
    position only if its norm is below scale / 65504, ~3e-4 for 96 channels)."""
    norm = torch.linalg.vector_norm(x, dim=1 if self.channel_first else -1, keepdim=True, dtype=torch.float32)
    factor = (self.scale / norm.clamp_min(NORM_EPS)).clamp_max(torch.finfo(x.dtype).max)
    out = x * factor.to(x.dtype)
    out.mul_(self.gamma)
    if isinstance(self.bias, torch.Tensor):
        out.add_(self.bias)
    return out


class Float16Overflow(ArithmeticError):
    """A chunk a float16 VAE computed is not finite."""


def fall_back_to_float32_on_overflow(vae) -> None:
    """Make a float16 ``vae`` (an ``AutoencoderKLWan``) encode or decode in float32 what overflows.

    Its encoder and decoder compute one chunk of frames per call. On CUDA each chunk's
    finiteness is checked when the next chunk has been queued, so the device never waits for
    the check (the last chunk's when the pass ends), on the CPU at once: either way before a
    streaming decode hands the chunk on (:func:`inference.generate.generate_frames` hands CUDA
    chunks on one chunk late). A chunk that is not finite ends the pass; the VAE turns float32
    for good (logged as a warning) and the encode or decode runs again from the start. A decode
    pass starts with ``first_chunk=True`` in the decoder's call, which is how a streaming
    consumer can tell a rerun."""
    pending: list = []  # at most one CUDA chunk's (finite flag in pinned host memory, its copy's event)
    for coder in (vae.encoder, vae.decoder):
        coder.forward = types.MethodType(_checked_chunk_forward(pending), coder)
    for name in ("_encode", "_decode"):
        setattr(vae, name, _rerun_in_float32_on_overflow(vae, getattr(vae, name), pending))


def _check_pending(pending: list) -> None:
    """Raise :class:`Float16Overflow` if the chunk awaiting its check was not finite."""
    if pending:
        finite, copied = pending.pop()
        copied.synchronize()
        if not finite.item():
            raise Float16Overflow("a float16 VAE chunk is not finite")


def _checked_chunk_forward(pending: list):
    def forward(self, x, *args, **kwargs):
        dtype = self.conv_in.weight.dtype
        if dtype != torch.float16:
            return type(self).forward(self, x.to(dtype), *args, **kwargs)
        out = type(self).forward(self, x, *args, **kwargs)
        finite = torch.isfinite(out).all()
        if out.device.type != "cuda":  # nothing runs ahead on the CPU: check at once
            if not finite:
                raise Float16Overflow("a float16 VAE chunk is not finite")
            return out
        _check_pending(pending)  # the previous chunk's: this one's work is queued behind it
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(out.device))
        pending.append((host, copied))
        return out

    return forward


def _rerun_in_float32_on_overflow(vae, run, pending: list):
    def run_checked(x, *args, **kwargs):
        pending.clear()
        try:
            result = run(x, *args, **kwargs)
            _check_pending(pending)  # the last chunk's
            return result
        except Float16Overflow:
            logger.warning("the float16 VAE overflowed; it computes in float32 from now on")
            pending.clear()
            vae.to(torch.float32)
            return run(x.float(), *args, **kwargs)

    return run_checked
