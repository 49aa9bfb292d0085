"""Random-weight Wan2.1 T2V components with the real shapes (1.3B, 14B), for the GPU benchmarks.

Random weights give meaningless pictures but real compute and memory. ``meta`` as the device
builds the shapes only (``bench/inference.py --dry-run``).
"""

from __future__ import annotations

import contextlib

import torch

# Wan2.1 transformer shapes (diffusers' WanTransformer3DModel arguments beyond the shared ones).
TRANSFORMER_SHAPES = {
    "1.3b": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "14b": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
}
# UMT5-XXL, the text encoder of every Wan2.1 model.
TEXT_ENCODER_CONFIG = dict(
    vocab_size=256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_components(config: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Real-size Wan2.1 T2V components with random weights, allocated on ``device`` in ``dtype``,
    except the VAE (see :func:`build_random_vae`).

    Built under ``torch.device(device)`` so weights are created where they live (``meta``:
    shapes only, nothing allocated); minutes on CPU, seconds on a GPU.
    """
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from inference.tiny import build_tiny_tokenizer

    with torch.device(device), default_dtype(dtype):
        text_encoder = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).eval()  # eval: no dropout
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return dict(tokenizer=build_tiny_tokenizer(), text_encoder=text_encoder, vae=build_random_vae(device),
                transformer=build_random_transformer(config, device, dtype), scheduler=scheduler)


def build_random_transformer(config: str, device: torch.device, dtype: torch.dtype):
    """The ``config``'s Wan2.1 transformer with random weights on ``device``: ``dtype``, except
    what ``from_pretrained`` would keep in float32."""
    from diffusers import WanTransformer3DModel

    with torch.device(device), default_dtype(dtype):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **TRANSFORMER_SHAPES[config],
        )
    keep_float32_like_from_pretrained(transformer)
    return transformer


def build_random_vae(device: torch.device):
    """The Wan2.1 VAE with random weights on ``device``, in float32: as diffusers' Wan2.1
    documentation loads it beside a bfloat16 pipeline (the fast path's ``vae_dtype`` then casts
    it: ``auto`` is float16 on CUDA)."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan()


def keep_float32_like_from_pretrained(model) -> None:
    """Upcast what diffusers' ``from_pretrained`` keeps in float32 (``_keep_in_fp32_modules``).

    Same rule as diffusers' loader: a parameter or buffer whose dotted name has one of those
    module names as a part (the Wan transformer's norms, time embedder, modulation tables).
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if keep & set(name.split(".")) and tensor.is_floating_point():
            tensor.data = tensor.data.float()
