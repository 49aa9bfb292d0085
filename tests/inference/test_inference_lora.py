"""LoRA per request: names inside the LoRA directory only, switching without reloads, base weights untouched."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from inference.generate import GenerationRequest, generate_frames
from inference.lora import (
    LoraError,
    active_lora,
    apply_lora,
    base_weights_checksum,
    list_loras,
    loaded_loras,
    lora_load_count,
    resolve_lora_file,
    unload_loras,
)
from inference.tiny import build_tiny_lora


def small_request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a red cat runs on the beach", num_frames=5, height=32, width=32, infer_steps=2, seed=3)
    fields.update(overrides)
    return GenerationRequest(**fields)


def test_list_loras_names_the_safetensors_files_inside_the_directory(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    root = tmp_path / "loras"
    (root / "sub").mkdir(parents=True)
    for name in ("alpha.safetensors", "beta-v2.1.safetensors", ".hidden.safetensors", "notes.txt",
                 "sub/nested.safetensors"):
        (root / name).write_bytes(b"x")
    (root / "folder.safetensors").mkdir()
    (root / "escape.safetensors").symlink_to(outside)
    (root / "alias.safetensors").symlink_to(root / "alpha.safetensors")
    assert list_loras(root) == ["alias", "alpha", "beta-v2.1"]
    assert resolve_lora_file(root, "alias") == (root / "alpha.safetensors").resolve()
    assert list_loras(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "name",
    ["../outside", "..", "sub/nested", "/etc/passwd", ".hidden", "escape", "folder", "missing",
     "alpha.safetensors", "", "alpha\x00", "a" * 129],
)
def test_traversal_malformed_and_unknown_names_are_refused(tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    root = tmp_path / "loras"
    (root / "sub").mkdir(parents=True)
    for file_name in ("alpha.safetensors", ".hidden.safetensors", "sub/nested.safetensors"):
        (root / file_name).write_bytes(b"x")
    (root / "folder.safetensors").mkdir()
    (root / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(LoraError):
        resolve_lora_file(root, name)


@pytest.mark.parametrize("overrides", [dict(lora_name="../alpha"), dict(lora_name="a/b"), dict(lora_strength=2.5),
                                       dict(lora_strength=-0.1), dict(lora_strength=float("nan"))])
def test_request_rejects_bad_lora_name_or_strength(overrides):
    with pytest.raises(ValueError):
        small_request(**overrides)


def test_two_loras_and_none_differ_and_none_afterwards_matches_a_pipeline_that_never_had_one(
        fresh_t2v_pipe, t2v_pipe, lora_dir):
    pipe = fresh_t2v_pipe
    checksum_before = base_weights_checksum(pipe.transformer)
    keys_before = set(pipe.transformer.state_dict())
    alpha = generate_frames(pipe, small_request(lora_name="alpha"), lora_dir=lora_dir)
    beta = generate_frames(pipe, small_request(lora_name="beta"), lora_dir=lora_dir)
    after = generate_frames(pipe, small_request(), lora_dir=lora_dir)
    never_had_one = generate_frames(t2v_pipe, small_request())

    np.testing.assert_array_equal(after, never_had_one)
    for with_lora in (alpha, beta):
        assert np.abs(with_lora.astype(int) - never_had_one).mean() > 0.5, "a LoRA must visibly change the frames"
    assert not np.array_equal(alpha, beta)
    assert base_weights_checksum(pipe.transformer) == checksum_before
    assert pipe.num_fused_loras == 0 and active_lora(pipe) is None
    assert loaded_loras(pipe) == ["alpha", "beta"]

    unload_loras(pipe)
    assert set(pipe.transformer.state_dict()) == keys_before  # the original layers are back
    assert base_weights_checksum(pipe.transformer) == checksum_before
    np.testing.assert_array_equal(generate_frames(pipe, small_request()), never_had_one)


def test_same_lora_again_is_not_reloaded_and_switching_back_reproduces_it(fresh_t2v_pipe, lora_dir):
    pipe = fresh_t2v_pipe
    first = generate_frames(pipe, small_request(lora_name="alpha"), lora_dir=lora_dir)
    again = generate_frames(pipe, small_request(lora_name="alpha"), lora_dir=lora_dir)
    assert lora_load_count(pipe) == 1
    generate_frames(pipe, small_request(lora_name="beta"), lora_dir=lora_dir)
    generate_frames(pipe, small_request(), lora_dir=lora_dir)
    back = generate_frames(pipe, small_request(lora_name="alpha"), lora_dir=lora_dir)
    assert lora_load_count(pipe) == 2
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, back)


def test_strength_zero_is_no_lora_and_strength_scales_the_effect(fresh_t2v_pipe, lora_dir):
    pipe = fresh_t2v_pipe
    none = generate_frames(pipe, small_request())
    zero = generate_frames(pipe, small_request(lora_name="alpha", lora_strength=0.0), lora_dir=lora_dir)
    assert lora_load_count(pipe) == 0  # strength 0 never loads the file
    np.testing.assert_array_equal(zero, none)
    half = generate_frames(pipe, small_request(lora_name="alpha", lora_strength=0.5), lora_dir=lora_dir)
    full = generate_frames(pipe, small_request(lora_name="alpha", lora_strength=1.0), lora_dir=lora_dir)
    assert lora_load_count(pipe) == 1
    assert not np.array_equal(half, full) and not np.array_equal(half, none)
    # Zero on a pipe that has the adapter loaded is still exactly no LoRA.
    np.testing.assert_array_equal(
        generate_frames(pipe, small_request(lora_name="alpha", lora_strength=0.0), lora_dir=lora_dir), none)


def test_lora_applies_to_i2v_pipelines_too(fresh_i2v_pipe, i2v_pipe, lora_dir):
    image = Image.new("RGB", (32, 32), (180, 60, 30))
    checksum_before = base_weights_checksum(fresh_i2v_pipe.transformer)
    with_lora = generate_frames(fresh_i2v_pipe, small_request(image=image, lora_name="beta"), lora_dir=lora_dir)
    without = generate_frames(fresh_i2v_pipe, small_request(image=image))
    np.testing.assert_array_equal(without, generate_frames(i2v_pipe, small_request(image=image)))
    assert not np.array_equal(with_lora, without)
    assert base_weights_checksum(fresh_i2v_pipe.transformer) == checksum_before


def test_least_recently_used_lora_is_dropped_beyond_capacity(fresh_t2v_pipe, lora_dir):
    pipe = fresh_t2v_pipe
    apply_lora(pipe, lora_dir, "alpha", max_loaded=1)
    apply_lora(pipe, lora_dir, "beta", max_loaded=1)
    assert loaded_loras(pipe) == ["beta"] and list(pipe.transformer.peft_config) == ["adapter1"]
    apply_lora(pipe, lora_dir, "alpha", max_loaded=1)
    assert lora_load_count(pipe) == 3 and active_lora(pipe) == ("alpha", 1.0)
    apply_lora(pipe, lora_dir, None)
    assert active_lora(pipe) is None


def test_rewritten_lora_file_is_loaded_afresh(fresh_t2v_pipe, lora_dir, tmp_path):
    root = tmp_path / "loras"
    path = build_tiny_lora(fresh_t2v_pipe, root / "style.safetensors", seed=5)
    first = generate_frames(fresh_t2v_pipe, small_request(lora_name="style"), lora_dir=root)
    build_tiny_lora(fresh_t2v_pipe, path, seed=6)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks: force a new mtime
    second = generate_frames(fresh_t2v_pipe, small_request(lora_name="style"), lora_dir=root)
    assert lora_load_count(fresh_t2v_pipe) == 2 and loaded_loras(fresh_t2v_pipe) == ["style"]
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("content", ["garbage", "wrong_shapes"])
def test_unloadable_file_raises_lora_error_and_leaves_no_lora_active(fresh_t2v_pipe, lora_dir, tmp_path, content):
    import types

    pipe = fresh_t2v_pipe
    none = generate_frames(pipe, small_request())
    generate_frames(pipe, small_request(lora_name="alpha"), lora_dir=lora_dir)
    root = tmp_path / "loras"
    root.mkdir()
    if content == "garbage":
        (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    else:  # a LoRA for a transformer twice as wide
        wider = types.SimpleNamespace(config=dict(num_attention_heads=4, attention_head_dim=12, num_layers=2))
        build_tiny_lora(wider, root / "broken.safetensors", seed=0)
    with pytest.raises(LoraError, match="broken"):
        generate_frames(pipe, small_request(lora_name="broken"), lora_dir=root)
    assert active_lora(pipe) is None and loaded_loras(pipe) == ["alpha"]
    np.testing.assert_array_equal(generate_frames(pipe, small_request()), none)
    assert lora_load_count(pipe) == 1


def test_lora_request_without_a_lora_directory_is_refused(fresh_t2v_pipe):
    with pytest.raises(LoraError, match="no LoRA directory"):
        generate_frames(fresh_t2v_pipe, small_request(lora_name="alpha"))


def test_concurrent_requests_with_different_loras_each_get_their_own_frames(fresh_t2v_pipe, lora_dir):
    from concurrent.futures import ThreadPoolExecutor

    pipe = fresh_t2v_pipe
    names = ["alpha", "beta", None, "alpha"]
    serial = [generate_frames(pipe, small_request(lora_name=name), lora_dir=lora_dir) for name in names]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(
            lambda name: generate_frames(pipe, small_request(lora_name=name), lora_dir=lora_dir), names))
    for expected, got in zip(serial, concurrent):
        np.testing.assert_array_equal(got, expected)
    assert lora_load_count(pipe) == 2


def test_a_compiled_pipeline_serves_any_number_of_loras_each_as_an_eager_run_gives_it(
        tiny_models, fresh_t2v_pipe, t2v_pipe, tmp_path):
    """Compiled blocks were specialised on the adapters loaded: the ninth new adapter failed the run
    (recompile limit, a hard error under fullgraph). LoRA runs now go eager; plain runs stay compiled."""
    from torch._dynamo.utils import counters

    from inference.options import InferenceOptions
    from inference.pipelines import load_pipeline

    names = [f"style{index}" for index in range(10)]  # more than dynamo's 8 recompiles, more than 4 kept
    for index, name in enumerate(names):
        build_tiny_lora(tiny_models["t2v"], tmp_path / f"{name}.safetensors", seed=index + 1)
    compiled = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu",
                             options=InferenceOptions(compile=True, text_cache_size=8))  # fmt: skip
    request = small_request(infer_steps=1)
    plain = generate_frames(compiled, request)
    assert np.abs(plain.astype(int) - generate_frames(t2v_pipe, request)).max() <= 2  # inductor's float order
    graphs_before = counters["stats"]["unique_graphs"]

    for index, name in enumerate(names):
        lora_request = small_request(infer_steps=1, lora_name=name, lora_strength=0.5 + index / 10)
        np.testing.assert_array_equal(
            generate_frames(compiled, lora_request, lora_dir=tmp_path),
            generate_frames(fresh_t2v_pipe, lora_request, lora_dir=tmp_path),
        )
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing was compiled for the LoRA runs
    # A plain run after LoRAs were loaded compiles once more (PEFT wrapped the layers), then is served.
    np.testing.assert_array_equal(generate_frames(compiled, request), plain)


# Run in a fresh interpreter: dynamo's cache of the blocks' code and its guards carry over between
# the tests of one process, so whether a LoRA's layers need a new graph there depends on test order.
_PAST_THE_LIMIT = """
import dataclasses
import sys
import numpy as np
import torch
from inference import fastpath
from inference.generate import GenerationRequest, generate_frames
from inference.options import InferenceOptions
from inference.pipelines import load_pipeline

model, lora_dir, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
fastpath.COMPILE_BACKEND = "eager"  # what dynamo traces, in seconds
compiled = load_pipeline(model, kind="t2v", device="cpu", options=InferenceOptions(compile=True))
eager = load_pipeline(model, kind="t2v", device="cpu", options=InferenceOptions(compile=False))
request = GenerationRequest(prompt="a cat", height=32, width=32, num_frames=5, infer_steps=1, seed=7)
expected = generate_frames(eager, request)
with torch._dynamo.config.patch(recompile_limit=2):
    for target in targets:
        generate_frames(compiled, dataclasses.replace(request, lora_name=target), lora_dir=lora_dir)
        assert np.array_equal(generate_frames(compiled, request), expected), target
print("stance", fastpath.plain_run_stance())
"""


def test_plain_runs_go_on_eagerly_once_loras_used_up_the_recompile_limit(tiny_models, tmp_path):
    """Each set of layers LoRAs wrap makes plain runs compile a graph of their own, and all blocks share
    dynamo's recompile limit: past it every plain run failed (fullgraph) until the worker restarted."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from tests.conftest import REPO_ROOT

    config = json.loads((tiny_models["t2v"] / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q"]  # a new set of wrapped layers each
    for index, target in enumerate(targets):
        generator = torch.Generator().manual_seed(index)
        save_file({
            f"transformer.blocks.0.{target}.lora_A.weight": torch.randn(4, inner, generator=generator) / inner**0.5,
            f"transformer.blocks.0.{target}.lora_B.weight": torch.randn(inner, 4, generator=generator),
        }, tmp_path / f"{target}.safetensors")  # fmt: skip

    result = subprocess.run(
        [sys.executable, "-c", _PAST_THE_LIMIT, str(tiny_models["t2v"]), str(tmp_path), *targets],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "stance eager_on_recompile"  # the limit was reached
