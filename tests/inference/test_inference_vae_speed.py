"""inference.vae_speed: the fast Wan VAE decode gives the stock decode's frames (float rounding only),
in float32, bfloat16 and float16, for decoding and the I2V encode, and through the pipeline's
streaming decode; a float16 VAE computes again in float32 what overflows."""

import copy
import dataclasses
import logging

import numpy as np
import pytest
import torch

import inference.vae_speed as vae_speed
from inference.generate import GenerationRequest, generate_frames
from inference.options import InferenceOptions
from inference.pipelines import applied_options, load_pipeline

LEVEL = 2 / 255  # one 0-255 pixel level in the VAE's [-1, 1] output
# The overflow fallback checks CUDA chunks one chunk late, CPU chunks at once: both where there is a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def with_random_biases_and_gains(vae):
    """``vae`` with its biases and norm gains drawn at random, in place (diffusers initialises gains
    to one and biases to zero, which would hide a dropped one)."""
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
            elif name.endswith("gamma"):
                parameter.normal_(mean=1.0, std=0.1)
    return vae


@pytest.fixture(scope="module")
def wan21_vae():
    """A VAE of the real Wan2.1 configuration with random weights, biases and norm gains."""
    from bench.random_models import build_random_vae

    torch.manual_seed(0)
    vae = build_random_vae(torch.device("cpu")).eval()
    return with_random_biases_and_gains(vae)


@pytest.fixture(scope="module")
def small_vae():
    """A Wan VAE of fewer, narrower layers with random biases and gains: half-precision convolutions
    on the CPU are too slow for the real configuration."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    return with_random_biases_and_gains(vae)


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def wan21_stock_decode(wan21_vae):
    """(latents, ``wan21_vae``'s stock float32 decode of them): four latent frames -> 13 frames."""
    latents = torch.randn(1, 16, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    return latents, _decode(wan21_vae, latents)


NO_CHANGE = dict(channels_last=False, lean_ops=False, lean_upsample=False, padded_inputs=False)


@pytest.mark.parametrize("changes", [dict(NO_CHANGE, **{change: True}) for change in NO_CHANGE] + [dict()],
                         ids=list(NO_CHANGE) + ["all"])
def test_each_change_decodes_the_stock_frames_in_float32(wan21_vae, wan21_stock_decode, changes):
    latents, stock_frames = wan21_stock_decode
    fast = copy.deepcopy(wan21_vae)
    vae_speed.speed_up_decoder(fast, **changes)
    fast_frames = _decode(fast, latents)
    assert fast_frames.shape == stock_frames.shape == (1, 3, 13, 48, 80)
    assert (fast_frames - stock_frames).abs().max() < 0.01 * LEVEL


@pytest.mark.parametrize("vae_name, dtype, device", [
    ("wan21_vae", torch.float32, "cpu"),
    # Half-precision convolutions on a CPU without AVX-512 take minutes at the real configuration.
    ("small_vae", torch.bfloat16, "cpu"),
    ("small_vae", torch.float16, "cpu"),
    *[pytest.param("wan21_vae", dtype, "cuda", marks=DEVICES[1].marks) for dtype in (torch.float32, torch.float16)],
])
def test_lean_upsample_and_padded_inputs_move_values_not_results(request, vae_name, dtype, device):
    """The two changes only skip copies and float32 round trips of values that reach the same
    kernels: the same frames and latents, to the bit but for float32 SiLUs on the CPU (its
    vectorised and scalar loops round the last bit differently). Four latent frames and a
    five-frame video go through the first chunk (no cache), a one-frame cache and full caches."""
    vae = copy.deepcopy(request.getfixturevalue(vae_name)).to(device, dtype)
    before, after = copy.deepcopy(vae), vae
    vae_speed.speed_up_decoder(before, lean_upsample=False, padded_inputs=False)
    vae_speed.speed_up_decoder(after)
    latents = torch.randn(1, 16, 4, 6, 10, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    video = (torch.rand(1, 3, 5, 48, 80, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        results = [(model.decode(latents, return_dict=False)[0], model.encode(video).latent_dist.mean)
                   for model in (before, after)]
    for before_result, after_result in zip(*results):
        if dtype == torch.float32 and device == "cpu":
            assert (after_result - before_result).abs().max() < 0.001 * LEVEL
        else:
            assert torch.equal(after_result, before_result)


def test_a_tiled_fast_decode_gives_the_stock_tiled_frames(small_vae):
    """Tiles go through the same changed modules, each with its own causal caches."""
    stock = copy.deepcopy(small_vae)
    stock.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                        tile_sample_stride_height=16, tile_sample_stride_width=16)
    fast = copy.deepcopy(stock)
    vae_speed.speed_up_decoder(fast)
    latents = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(7))
    stock_frames, fast_frames = _decode(stock, latents), _decode(fast, latents)
    assert fast_frames.shape == (1, 3, 9, 48, 80)  # 6x10 latents: tiles of 4x4 latents, blended
    assert (fast_frames - stock_frames).abs().max() < 0.01 * LEVEL


def test_bfloat16_fast_decode_is_no_further_from_float32_than_stock_bfloat16(small_vae):
    latents = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    reference = _decode(small_vae, latents)
    stock_bf16 = copy.deepcopy(small_vae).to(torch.bfloat16)
    fast_bf16 = copy.deepcopy(stock_bf16)
    vae_speed.speed_up_decoder(fast_bf16)
    stock_error, fast_error = (_decode(vae, latents) - reference for vae in (stock_bf16, fast_bf16))
    # Other rounding orders, not more rounding: measured RMS 1.04-1.05x and max 0.93-1.12x stock's over three seeds.
    assert fast_error.pow(2).mean().sqrt() <= stock_error.pow(2).mean().sqrt() * 1.1
    assert fast_error.abs().max() <= stock_error.abs().max() * 1.25


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
    norm must not turn 0 * inf into NaN (it caps the factor at float16's largest value)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = WanRMS_norm(8, images=False).to(dtype)
    x = torch.randn(1, 8, 2, 3, 3, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[:, :, 0, 1, 1] = 0
    with torch.no_grad():
        stock = norm(x)
        lean = vae_speed._rms_norm_forward(norm, x)
    assert torch.isfinite(lean).all() and (lean[:, :, 0, 1, 1] == 0).all()
    assert torch.allclose(lean.float(), stock.float(), atol=0.02 if dtype != torch.float32 else 1e-6)


def test_float16_fast_decode_is_far_closer_to_float32_than_bfloat16(small_vae):
    latents = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    reference = _decode(small_vae, latents)
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        fast = copy.deepcopy(small_vae).to(dtype)
        vae_speed.speed_up_decoder(fast)
        errors[dtype] = (_decode(fast, latents) - reference).abs().max()
    assert errors[torch.float16] < 0.5 * LEVEL < errors[torch.bfloat16] / 3  # measured 0.32 and 2.0 levels


def _overflowing(vae, conv: str):
    """A copy of ``vae`` whose ``conv`` (encoder or decoder ``conv_in``) weights are 50x: large
    inputs then overflow float16 right after it, nothing overflows float32."""
    vae = copy.deepcopy(vae)
    with torch.no_grad():
        getattr(vae, conv).conv_in.weight.mul_(50)
    return vae


@pytest.mark.parametrize("device", DEVICES)
def test_a_float16_decode_that_overflows_is_decoded_again_in_float32(small_vae, caplog, device):
    vae = _overflowing(small_vae, "decoder").to(device)
    latents = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(2)).to(device)
    latents[:, :, 2] *= 2000  # only the third latent frame (output frames 5..8) overflows
    reference = _decode(vae, latents)
    half = copy.deepcopy(vae).to(torch.float16)
    vae_speed.speed_up_decoder(half)
    unguarded = _decode(half, latents)
    assert torch.isfinite(unguarded[:, :, :5]).all() and not torch.isfinite(unguarded).all()

    vae_speed.fall_back_to_float32_on_overflow(half)
    with caplog.at_level(logging.WARNING, logger="inference.vae_speed"):
        guarded = _decode(half, latents)
    assert half.dtype == torch.float32 and "overflowed" in caplog.text
    rounded = copy.deepcopy(vae).to(torch.float16).float()  # the weights and latents the rerun has
    vae_speed.speed_up_decoder(rounded)
    assert torch.equal(guarded, _decode(rounded, latents.half().float()))  # decoded again, all float32
    assert (guarded - reference).abs().max() < 0.5 * LEVEL


def test_a_float16_encoder_that_overflows_encodes_again_in_float32(small_vae):
    vae = _overflowing(small_vae, "encoder")
    video = torch.rand(1, 3, 5, 48, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1
    video[:, :, 1:] *= 3000  # the first frame (chunk) is fine, the next four overflow
    with torch.no_grad():
        reference = vae.encode(video).latent_dist.mean
        half = copy.deepcopy(vae).to(torch.float16)
        assert not torch.isfinite(half.encode(video.half()).latent_dist.mean).all()
        vae_speed.fall_back_to_float32_on_overflow(half)
        latents = half.encode(video.half()).latent_dist.mean
    assert torch.isfinite(latents).all() and half.dtype == torch.float32
    assert torch.allclose(latents.float(), reference, atol=0.05)


def test_a_float16_vae_in_the_pipeline_streams_what_it_returns(tiny_models, t2v_pipe):
    """The tiny model's 3-channel VAE magnifies rounding (stock float16 and bfloat16 move some pixels
    by 60+ levels); ``small_vae`` above holds float16's precision on wider layers."""
    assert applied_options(t2v_pipe)["vae_dtype"] == "float32"  # auto on CPU
    half_pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu",
                              options=InferenceOptions(vae_dtype="float16", vae_decode="fast"))
    assert applied_options(half_pipe)["vae_dtype"] == "float16" and half_pipe.vae.dtype == torch.float16
    request = GenerationRequest(prompt="a cat", num_frames=9, height=32, width=32, infer_steps=2, seed=5)
    streamed = []
    half_frames = generate_frames(half_pipe, request, on_frames=streamed.append)
    assert np.array_equal(np.concatenate(streamed), half_frames)
    assert np.abs(half_frames.astype(int) - generate_frames(t2v_pipe, request).astype(int)).mean() < 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_streaming_decode_that_overflows_hands_each_frame_on_once_and_never_a_bad_one(tiny_models, device):
    """The third decoder call of the float16 pass gets an input that overflows float16 (as content
    could); the float32 rerun decodes it normally. What was handed on before stays, the rest
    comes from the rerun, nothing twice, nothing non-finite."""
    options = InferenceOptions(vae_dtype="float16", vae_decode="fast")
    plain = load_pipeline(tiny_models["t2v"], kind="t2v", device=device, options=options)
    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device=device,
                         options=dataclasses.replace(options, text_cache_size=1))  # another copy
    calls = []

    def overflow_third_float16_call(module, args, kwargs):
        calls.append(args[0].dtype)
        if len(calls) == 3 and args[0].dtype == torch.float16:
            return (args[0] * 60000,), kwargs
        return None

    handle = pipe.vae.decoder.register_forward_pre_hook(overflow_third_float16_call, with_kwargs=True)
    try:
        request = GenerationRequest(prompt="a cat", num_frames=17, height=32, width=32, infer_steps=2, seed=5)
        streamed = []
        frames = generate_frames(pipe, request, on_frames=streamed.append)
    finally:
        handle.remove()
    float16_calls = 3 if device == "cpu" else 4  # found in its own call, or (CUDA) in the next one
    assert calls == [torch.float16] * float16_calls + [torch.float32] * 5 and pipe.vae.dtype == torch.float32
    assert [len(chunk) for chunk in streamed] == [1, 4, 4, 4, 4]  # two from float16, three from the rerun
    assert np.array_equal(np.concatenate(streamed), frames)
    assert np.array_equal(frames[:5], generate_frames(plain, request)[:5])  # the float16 pass's frames
