"""InferenceOptions and how load_pipeline applies them: parsing, defaults, auto resolution, errors."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from inference import fastpath
from inference.generate import GenerationRequest, generate_frames
from inference.options import OPTION_NAMES, InferenceOptions
from inference.pipelines import ModelLoadError, applied_options, load_count, load_pipeline
from inference.prompt_cache import prompt_cache_for

SMALL = dict(prompt="a cat", num_frames=5, height=32, width=32, infer_steps=2)


def test_defaults_are_the_lossless_choices():
    options = InferenceOptions()
    assert options.as_strings() == {
        "attention_backend": "auto", "compile": "auto", "cache": "none", "cache_threshold": "0.05",
        "vae_tiling": "auto", "vae_dtype": "auto", "vae_decode": "auto", "text_cache_size": "32", "fp8": "off",
    }


def test_option_names_list_every_field_for_settings_code():
    assert OPTION_NAMES == ("attention_backend", "compile", "cache", "cache_threshold", "vae_tiling", "vae_dtype",
                            "vae_decode", "text_cache_size", "fp8")


def test_from_strings_parses_every_field_trimmed_and_case_insensitive():
    options = InferenceOptions.from_strings({
        "attention_backend": " _Native_CUDNN ", "compile": "ON", "cache": "first_block",
        "cache_threshold": "0.1", "vae_tiling": "off", "vae_dtype": "bfloat16", "vae_decode": "Fast ",
        "text_cache_size": "0", "fp8": " Storage",
    })
    assert options == InferenceOptions(
        attention_backend="_native_cudnn", compile=True, cache="first_block", cache_threshold=0.1,
        vae_tiling="off", vae_dtype="bfloat16", vae_decode="fast", text_cache_size=0, fp8="storage",
    )


@pytest.mark.parametrize("text, value", [("auto", None), ("1", True), ("yes", True), ("0", False), ("false", False)])
def test_compile_accepts_auto_and_boolean_words(text, value):
    assert InferenceOptions.from_strings({"compile": text}).compile is value


def test_missing_and_empty_strings_keep_defaults():
    assert InferenceOptions.from_strings({}) == InferenceOptions()
    assert InferenceOptions.from_strings({"cache": "", "text_cache_size": "  "}) == InferenceOptions()


def test_as_strings_round_trips_through_from_strings():
    options = InferenceOptions(attention_backend="flash", compile=False, cache="taylorseer", text_cache_size=4)
    assert InferenceOptions.from_strings(options.as_strings()) == options


@pytest.mark.parametrize(
    "values, message",
    [
        ({"attention": "flash"}, "unknown inference option"),
        ({"attention_backend": "xformers"}, "attention_backend must be one of"),
        ({"compile": "maybe"}, "compile must be auto, on or off"),
        ({"cache": "fast"}, "cache must be one of"),
        ({"cache_threshold": "high"}, "cache_threshold must be a number"),
        ({"cache_threshold": "0"}, "cache_threshold must be a number > 0"),
        ({"vae_tiling": "sometimes"}, "vae_tiling must be one of"),
        ({"vae_dtype": "fp8"}, "vae_dtype must be one of"),
        ({"vae_decode": "faster"}, "vae_decode must be one of"),
        ({"text_cache_size": "many"}, "text_cache_size must be an integer"),
        ({"text_cache_size": "-1"}, "text_cache_size must be an integer >= 0"),
        ({"text_cache_size": 3}, "must be given as a string"),
        ({"fp8": "on"}, "fp8 must be one of off, storage, compute"),
    ],
)
def test_bad_strings_raise_value_error_naming_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        InferenceOptions.from_strings(values)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="vae_dtype"):
        InferenceOptions(vae_dtype="float64")


def test_default_options_leave_a_cpu_pipeline_as_loaded(t2v_pipe):
    assert applied_options(t2v_pipe) == {
        "attention_backend": "native", "compile": "off", "cache": "none", "cache_threshold": "0.05",
        "vae_tiling": "off", "vae_dtype": "float32", "vae_decode": "stock", "text_cache_size": "32", "fp8": "off",
    }
    assert t2v_pipe.vae.dtype == torch.float32
    assert not t2v_pipe.vae.use_tiling
    assert all(block.attn1.processor._attention_backend is None for block in t2v_pipe.transformer.blocks)
    assert prompt_cache_for(t2v_pipe).max_entries == 32


def test_options_are_part_of_the_cache_key(tiny_models, t2v_pipe):
    loads_before = load_count()
    same = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions())
    assert same is t2v_pipe and load_count() == loads_before
    other = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(text_cache_size=2))
    assert other is not t2v_pipe and load_count() == loads_before + 1
    assert prompt_cache_for(other).max_entries == 2


@pytest.mark.parametrize("cache", ["first_block", "taylorseer"])
def test_lossy_and_memory_options_apply_and_still_generate(tiny_models, cache):
    options = InferenceOptions(cache=cache, cache_threshold=0.2, vae_tiling="on", vae_dtype="bfloat16")
    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=options)
    applied = applied_options(pipe)
    assert (applied["cache"], applied["vae_tiling"], applied["vae_dtype"]) == (cache, "on", "bfloat16")
    assert pipe.vae.dtype == torch.bfloat16 and pipe.vae.use_tiling
    for _ in range(2):  # the second run starts from reset cache state
        frames = generate_frames(pipe, GenerationRequest(**dict(SMALL, infer_steps=5)))
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8


def test_fp8_storage_keeps_block_weights_in_fp8_and_runs_with_and_without_a_lora(tiny_models, t2v_pipe, tmp_path):
    from inference.tiny import build_tiny_lora

    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(fp8="storage"))
    assert applied_options(pipe)["fp8"] == "storage"
    block = pipe.transformer.blocks[0]
    assert block.attn1.to_q.weight.dtype == block.ffn.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.patch_embedding.weight.dtype == torch.float32  # diffusers' skip list: as loaded
    stored = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert stored < 0.8 * sum(p.numel() * p.element_size() for p in t2v_pipe.transformer.parameters())

    request = GenerationRequest(**SMALL)
    plain = generate_frames(pipe, request)
    assert plain.shape == (5, 32, 32, 3) and plain.dtype == np.uint8
    build_tiny_lora(pipe.transformer, tmp_path / "style.safetensors", seed=3)
    styled = generate_frames(pipe, GenerationRequest(**SMALL, lora_name="style"), lora_dir=tmp_path)
    assert not np.array_equal(styled, plain)  # the LoRA ran (its weights in float32, not FP8)
    np.testing.assert_array_equal(generate_frames(pipe, request), plain)  # and left nothing behind


def test_fp8_compute_needs_an_fp8_gpu(tiny_models, monkeypatch):
    with pytest.raises(ModelLoadError, match="fp8=compute needs a CUDA GPU of compute capability 8.9"):
        load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(fp8="compute"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))  # an A100
    with pytest.raises(fastpath.OptionNotUsable, match="compute capability 8.9"):
        fastpath._apply_fp8(None, "compute", torch.device("cuda"))


def test_vae_in_another_dtype_than_the_transformer_runs_i2v(tiny_models):
    # The GPU default is this mix the other way round: bfloat16 transformer, float32 VAE.
    pipe = load_pipeline(tiny_models["i2v"], kind="i2v", device="cpu", options=InferenceOptions(vae_dtype="bfloat16"))
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (torch.float32, torch.bfloat16)
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    frames = generate_frames(pipe, GenerationRequest(**dict(SMALL, image=image)))
    assert frames.shape == (5, 32, 32, 3)


def test_explicit_native_backend_matches_the_default_frames(tiny_models, t2v_pipe):
    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu",
                         options=InferenceOptions(attention_backend="native"))
    assert applied_options(pipe)["attention_backend"] == "native"
    request = GenerationRequest(**SMALL)
    np.testing.assert_array_equal(generate_frames(pipe, request), generate_frames(t2v_pipe, request))


@pytest.mark.parametrize("backend", ["_native_cudnn", "flash", "sage"])
def test_explicit_backend_that_cannot_run_here_fails_the_load(tiny_models, backend):
    with pytest.raises(ModelLoadError, match=f"attention backend '{backend}' cannot run on cpu"):
        load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(attention_backend=backend))


@pytest.mark.parametrize("usable, expected, tried_first", [
    ({"_flash_3", "flash"}, "_flash_3", ["_flash_3"]),
    ({"flash"}, "flash", ["_flash_3", "flash"]),
    (set(), "native", ["_flash_3", "flash"]),  # never sage: it quantises
])  # fmt: skip
def test_auto_backend_on_cuda_picks_the_first_flash_attn_that_runs_else_torch_sdpa(
    monkeypatch, usable, expected, tried_first
):
    tried, chosen = [], []

    def runs(backend, device, dtype, head_dim):
        tried.append(backend)
        return backend in usable

    monkeypatch.setattr(fastpath, "_attention_backend_runs", runs)
    monkeypatch.setattr(fastpath, "_set_attention_backend", lambda transformer, backend: chosen.append(backend))
    transformer = types.SimpleNamespace(config=types.SimpleNamespace(attention_head_dim=128), dtype=torch.bfloat16)
    assert fastpath._apply_attention_backend(transformer, "auto", torch.device("cuda")) == expected
    assert tried == tried_first
    assert chosen == ([] if expected == "native" else [expected])  # native: diffusers' default is left alone


def test_setting_a_backend_leaves_the_process_default_alone(tiny_models):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions(text_cache_size=3))
    default_before = _AttentionBackendRegistry._active_backend
    fastpath._set_attention_backend(pipe.transformer, "_native_math")
    assert _AttentionBackendRegistry._active_backend == default_before
    assert pipe.transformer.blocks[0].attn1.processor._attention_backend.value == "_native_math"


class _Block(torch.nn.Module):
    pass


def _blocks_to_compile(monkeypatch) -> tuple[torch.nn.Module, list[dict]]:
    """A transformer of two repeated blocks, and the torch.compile calls _apply_compile makes."""
    transformer = torch.nn.Module()
    transformer._repeated_blocks = ("_Block",)
    transformer.blocks = torch.nn.ModuleList([_Block(), _Block()])
    calls = []
    monkeypatch.setattr(fastpath.torch, "compile", lambda function, **kwargs: calls.append(kwargs) or function)
    return transformer, calls


@pytest.mark.parametrize("triton_present, expected", [(True, "on"), (False, "off")])
def test_auto_compile_on_cuda_needs_triton(monkeypatch, triton_present, expected):
    transformer, compiled = _blocks_to_compile(monkeypatch)
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: object() if triton_present else None)
    assert fastpath._apply_compile(transformer, None, torch.device("cuda")) == expected
    assert compiled == ([{"fullgraph": True, "backend": "inductor"}] * 2 if triton_present else [])
    assert fastpath._apply_compile(transformer, None, torch.device("cpu")) == "off"


def test_fp8_storage_is_never_compiled(monkeypatch):
    transformer, compiled = _blocks_to_compile(monkeypatch)
    monkeypatch.setattr(fastpath.importlib.util, "find_spec", lambda name: object())
    assert fastpath._apply_compile(transformer, None, torch.device("cuda"), fp8="storage") == "off"
    with pytest.raises(fastpath.OptionNotUsable, match="compile=on cannot be combined with fp8=storage"):
        fastpath._apply_compile(transformer, True, torch.device("cuda"), fp8="storage")
    assert fastpath._apply_compile(transformer, None, torch.device("cuda"), fp8="compute") == "on"
    assert len(compiled) == 2  # each block once


@pytest.mark.parametrize("free_gib, expected", [(4, "on"), (60, "off")])
def test_auto_vae_tiling_turns_on_only_when_device_memory_is_short(monkeypatch, free_gib, expected):
    enabled = []
    vae = types.SimpleNamespace(enable_tiling=lambda: enabled.append(True))
    monkeypatch.setattr(fastpath, "_free_device_bytes", lambda device: free_gib * 2**30)
    assert fastpath._apply_vae_tiling(vae, "auto", torch.device("cuda")) == expected
    assert bool(enabled) == (expected == "on")
    assert fastpath._apply_vae_tiling(vae, "auto", torch.device("cpu")) == "off"
