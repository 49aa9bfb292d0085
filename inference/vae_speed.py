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
- ``lean_upsample``: the 2x upsampling runs in the VAE's dtype (nearest-neighbour only copies
  values: diffusers' float32 round trip is three passes over a 4x larger tensor that change
  nothing), and a time upsampling interleaves its doubled frames with one copy straight into the
  channels-last layout the following 2D convolution reads (diffusers: a stack, a reshape into
  NCHW, then cuDNN's transpose back).
- ``padded_inputs``: a residual block's norm and SiLU write into the time-padded input of the
  causal convolution that follows, behind the cached frames of the previous chunk, instead of
  into a tensor that the convolution then copies behind them (one pass less per convolution).

On an H200 (480x832x81) the first two took the float32 decode from 2.79 to 2.27 s and the bfloat16
one from 1.84 to 1.28 s (bench/README.md); the last two are not measured on a GPU yet (``bench/parts.py
--part vae-variants`` times each). Encoding (I2V) goes through the same changed modules.

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


def speed_up_decoder(
    vae, *, channels_last: bool = True, lean_ops: bool = True, lean_upsample: bool = True, padded_inputs: bool = True
) -> None:
    """Apply the chosen changes to ``vae`` (an ``AutoencoderKLWan``). Decoding and encoding
    afterwards give what the stock code gives, within float rounding (``lean_upsample`` changes
    no value, ``padded_inputs`` none but the last bit of some float32 SiLUs on the CPU, whose
    vectorised and scalar loops round differently); tiled decoding (``vae.enable_tiling()``)
    keeps working and uses the same changed modules."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanCausalConv3d,
        WanResample,
        WanResidualBlock,
        WanRMS_norm,
        WanUpsample,
    )

    for module in vae.modules():
        if channels_last and isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d)
        elif channels_last and isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
        if lean_ops and isinstance(module, WanCausalConv3d):
            module.forward = types.MethodType(_causal_conv_forward, module)
        elif lean_ops and isinstance(module, WanRMS_norm):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif lean_upsample and isinstance(module, WanUpsample) and module.mode in ("nearest", "nearest-exact"):
            module.forward = types.MethodType(torch.nn.Upsample.forward, module)
        elif lean_upsample and isinstance(module, WanResample) and module.mode == "upsample3d":
            module.forward = types.MethodType(_time_upsample_forward, module)
        elif padded_inputs and isinstance(module, WanResidualBlock) and isinstance(module.nonlinearity, torch.nn.SiLU):
            module.forward = types.MethodType(_residual_block_forward, module)


def _causal_conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with the spatial zero padding done by the convolution: only the
    causal past (cached frames, else zeros) is joined to ``x`` in time."""
    time_pad = self._padding[4]
    if cache_x is not None and time_pad > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        time_pad -= cache_x.shape[2]
    if time_pad > 0:
        x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
    return _conv_padded_in_time(self, x)


def _conv_padded_in_time(conv, x: torch.Tensor) -> torch.Tensor:
    """The causal convolution ``conv`` of ``x``, whose causal past is already in front of it in
    time; the spatial zero padding is done by the convolution."""
    width_pad, _, height_pad, _, _, _ = conv._padding
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, height_pad, width_pad), conv.dilation, conv.groups)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``WanRMS_norm.forward`` (``F.normalize`` over channels, times scale and gamma, plus bias) in
    three passes: the norm (accumulated in float32), one multiply by scale / norm, one by gamma in
    place. scale / norm is capped at ``x.dtype``'s largest value: float16 cannot hold scale / eps,
    and an all-zero position stays zero instead of becoming 0 * inf = NaN (the cap changes a
    position only if its norm is below scale / 65504, ~3e-4 for 96 channels)."""
    return _rms_norm(self, x)


def _rms_norm(module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_rms_norm_forward` of the norm ``module``, written into ``out`` (any strides) if given."""
    norm = torch.linalg.vector_norm(x, dim=1 if module.channel_first else -1, keepdim=True, dtype=torch.float32)
    factor = (module.scale / norm.clamp_min(NORM_EPS)).clamp_max(torch.finfo(x.dtype).max)
    out = torch.mul(x, factor.to(x.dtype), out=out)
    out.mul_(module.gamma)
    if isinstance(module.bias, torch.Tensor):
        out.add_(module.bias)
    return out


def _residual_block_forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """``WanResidualBlock.forward`` with each norm and SiLU written into its convolution's padded
    input (:func:`_norm_silu_conv`). Falls back to the stock code where dropout is active."""
    if feat_cache is None or (self.training and self.dropout.p > 0):
        return type(self).forward(self, x, feat_cache, feat_idx)
    shortcut = self.conv_shortcut(x)
    x = _norm_silu_conv(self.norm1, self.conv1, x, feat_cache, feat_idx)
    x = _norm_silu_conv(self.norm2, self.conv2, x, feat_cache, feat_idx)
    return x + shortcut


def _norm_silu_conv(norm, conv, x: torch.Tensor, feat_cache: list, feat_idx: list) -> torch.Tensor:
    """``conv(silu(norm(x)), cache)`` as the stock block computes it, the activation written
    once, behind the causal past (the cached frames of the previous chunk, zeros where there are
    none), into the tensor the convolution reads; the cache then holds the last ``CACHE_T``
    frames of the activation, including the past when this chunk has fewer (as stock)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T

    time_pad = conv._padding[4]
    idx = feat_idx[0]
    cached = feat_cache[idx]
    batch, channels, frames, height, width = x.shape
    layout = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format
    padded = torch.empty((batch, channels, time_pad + frames, height, width), dtype=x.dtype, device=x.device,
                         memory_format=layout)
    past = 0 if cached is None else min(cached.shape[2], time_pad)
    padded[:, :, : time_pad - past].zero_()
    if past:
        padded[:, :, time_pad - past : time_pad].copy_(cached[:, :, -past:])
    activation = padded[:, :, time_pad:]
    if getattr(norm.forward, "__func__", None) is _rms_norm_forward:
        _rms_norm(norm, x, out=activation)
    else:  # lean_ops off: the module's own norm, copied in
        activation.copy_(norm(x))
    F.silu(activation, inplace=True)
    feat_cache[idx] = padded[:, :, time_pad - past :][:, :, -CACHE_T:].clone()
    feat_idx[0] += 1
    return _conv_padded_in_time(conv, padded)


def _time_upsample_forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """``WanResample.forward`` for ``upsample3d``: the time convolution doubles the channels, and
    frame ``2i + j`` of the result is channel half ``j`` of its frame ``i``; those frames are
    copied once into the layout the 2D convolution reads. Without a cache, and on the first
    chunk (no time upsampling), the stock code runs."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T

    if feat_cache is None or feat_cache[feat_idx[0]] is None:
        return type(self).forward(self, x, feat_cache, feat_idx)
    batch, channels, frames, height, width = x.shape
    idx = feat_idx[0]
    cached = feat_cache[idx]
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < CACHE_T:  # the past's last frame in front, zeros after the first chunk ("Rep")
        past = torch.zeros_like(cache_x) if isinstance(cached, str) else cached[:, :, -1:]
        cache_x = torch.cat([past, cache_x], dim=2)
    doubled = self.time_conv(x) if isinstance(cached, str) else self.time_conv(x, cached)
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    conv2d = self.resample[1]
    layout = torch.channels_last if conv2d.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    per_frame = torch.empty((batch * frames * 2, channels, height, width), dtype=doubled.dtype, device=doubled.device,
                            memory_format=layout)
    per_frame.view(batch, frames, 2, channels, height, width).copy_(
        doubled.view(batch, 2, channels, frames, height, width).permute(0, 3, 1, 2, 4, 5)
    )
    out = self.resample(per_frame)
    return out.view(batch, frames * 2, *out.shape[1:]).permute(0, 2, 1, 3, 4)


class Float16Overflow(ArithmeticError):
    """A chunk a float16 VAE computed is not finite."""


def fall_back_to_float32_on_overflow(vae) -> None:
    """Make a float16 ``vae`` (an ``AutoencoderKLWan``) encode or decode in float32 what overflows.

    Its encoder and decoder compute one chunk of frames per call. On CUDA each chunk's
    finiteness is checked when the next chunk has been queued, so the device never waits for
    the check (the last chunk's when the pass ends), on the CPU at once: either way before a
    streaming decode hands the chunk on (:func:`inference.generate.generate_frames` hands CUDA
    chunks on one chunk late). A chunk that is not finite ends the pass; the VAE turns float32
    for good (logged as a warning) and the encode or decode runs again from the start (in float32,
    but from the weights as float16 rounded them: the checkpoint is not read again). A decode
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
        # Out of the except block: the float16 attempt's frames (and their activations) are let go first.
        pending.clear()
        vae.to(torch.float32)
        return run(x.float(), *args, **kwargs)

    return run_checked
