"""inference.vae_speed: the fast Wan VAE decode gives the stock decode's frames (float rounding only),
in float32 and bfloat16, for decoding and the I2V encode, and through the pipeline's streaming decode."""

import copy

import numpy as np
import pytest
import torch

import inference.vae_speed as vae_speed
from inference.generate import GenerationRequest, generate_frames
from inference.options import InferenceOptions
from inference.pipelines import applied_options, load_pipeline

LEVEL = 2 / 255  # one 0-255 pixel level in the VAE's [-1, 1] output


@pytest.fixture(scope="module")
def wan21_vae():
    """A VAE of the real Wan2.1 configuration with random weights, biases and norm gains (diffusers
    initialises gains to one and biases to zero, which would hide a dropped one)."""
    from bench.inference import build_random_vae

    torch.manual_seed(0)
    vae = build_random_vae(torch.device("cpu")).eval()
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
            elif name.endswith("gamma"):
                parameter.normal_(mean=1.0, std=0.1)
    return vae


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


@pytest.mark.parametrize("changes", [dict(channels_last=True, lean_ops=False), dict(channels_last=False, lean_ops=True),
                                     dict()])
def test_each_change_decodes_the_stock_frames_in_float32(wan21_vae, changes):
    latents = torch.randn(1, 16, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    fast = copy.deepcopy(wan21_vae)
    vae_speed.speed_up_decoder(fast, **changes)
    stock_frames, fast_frames = _decode(wan21_vae, latents), _decode(fast, latents)
    assert fast_frames.shape == stock_frames.shape == (1, 3, 13, 48, 80)
    assert (fast_frames - stock_frames).abs().max() < 0.01 * LEVEL


def test_bfloat16_fast_decode_is_no_further_from_float32_than_stock_bfloat16(wan21_vae):
    latents = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    reference = _decode(wan21_vae, latents)
    stock_bf16 = copy.deepcopy(wan21_vae).to(torch.bfloat16)
    fast_bf16 = copy.deepcopy(stock_bf16)
    vae_speed.speed_up_decoder(fast_bf16)
    stock_error = (_decode(stock_bf16, latents) - reference).abs().max()
    fast_error = (_decode(fast_bf16, latents) - reference).abs().max()
    assert fast_error <= stock_error * 1.1


def test_i2v_encode_through_the_changed_modules_is_unchanged(wan21_vae):
    video = torch.rand(1, 3, 5, 48, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1
    fast = copy.deepcopy(wan21_vae)
    vae_speed.speed_up_decoder(fast)
    with torch.no_grad():
        stock_latents = wan21_vae.encode(video).latent_dist.mean
        fast_latents = fast.encode(video).latent_dist.mean
    assert torch.allclose(fast_latents, stock_latents, atol=1e-5)


def test_vae_decode_option_auto_is_stock_on_cpu_and_fast_gives_the_same_video(tiny_models, t2v_pipe):
    assert applied_options(t2v_pipe)["vae_decode"] == "stock"
    fast_pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(vae_decode="fast"))
    assert applied_options(fast_pipe)["vae_decode"] == "fast"
    request = GenerationRequest(prompt="a cat", num_frames=9, height=32, width=32, infer_steps=2, seed=5)
    streamed = []
    fast_frames = generate_frames(fast_pipe, request, on_frames=streamed.append)
    stock_frames = generate_frames(t2v_pipe, request)
    assert np.array_equal(np.concatenate(streamed), fast_frames)
    assert np.abs(fast_frames.astype(int) - stock_frames.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_norm_keeps_an_all_zero_position_zero_in_every_dtype(dtype):
    """F.normalize maps a zero vector to zero; scale / eps does not fit in float16, where the lean
    norm must not turn 0 * inf into NaN (it defers to diffusers' forward there)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = WanRMS_norm(8, images=False).to(dtype)
    x = torch.randn(1, 8, 2, 3, 3, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[:, :, 0, 1, 1] = 0
    with torch.no_grad():
        stock = norm(x)
        lean = vae_speed._rms_norm_forward(norm, x)
    assert torch.isfinite(lean).all() and (lean[:, :, 0, 1, 1] == 0).all()
    assert torch.allclose(lean.float(), stock.float(), atol=0.02 if dtype != torch.float32 else 1e-6)
