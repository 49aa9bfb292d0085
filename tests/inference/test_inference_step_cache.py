"""The step caches (``cache`` = first_block | taylorseer): they skip transformer work, change the
frames, start afresh on every run, and run inside a full-graph compile of the blocks."""

import numpy as np
import pytest
import torch

from inference import fastpath
from inference.generate import GenerationRequest, generate_frames
from inference.options import InferenceOptions

CPU = torch.device("cpu")


def request(steps: int) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", num_frames=5, height=32, width=32, infer_steps=steps, seed=3)


def last_block_passes(pipe, steps: int) -> tuple[int, np.ndarray]:
    """How often the last transformer block computed during one ``steps``-step run, and its frames."""
    passes = []
    hook = pipe.transformer.blocks[-1].attn1.register_forward_pre_hook(lambda *args: passes.append(1))
    try:
        frames = generate_frames(pipe, request(steps))
    finally:
        hook.remove()
    return len(passes), frames


@pytest.mark.parametrize(
    "steps, computed",
    [(4, 3), (12, 5)],  # steps 0-2, then every fifth from step 4: 0 1 2 (3 predicted) / 0 1 2 4 9
)
def test_taylorseer_computes_its_schedule_and_extrapolates_the_other_steps(fresh_t2v_pipe, t2v_pipe, steps, computed):
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="taylorseer", text_cache_size=0), CPU)
    passes, frames = last_block_passes(fresh_t2v_pipe, steps)
    assert passes == computed
    assert not np.array_equal(frames, generate_frames(t2v_pipe, request(steps)))  # lossy: the predicted steps
    again_passes, again = last_block_passes(fresh_t2v_pipe, steps)  # the cache state starts afresh each run
    assert again_passes == computed
    np.testing.assert_array_equal(again, frames)


def test_first_block_cache_skips_the_later_blocks_on_similar_steps(fresh_t2v_pipe, t2v_pipe):
    steps = 12
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="first_block", cache_threshold=0.2), CPU)
    passes, frames = last_block_passes(fresh_t2v_pipe, steps)
    assert 1 <= passes < steps
    assert not np.array_equal(frames, generate_frames(t2v_pipe, request(steps)))
    again_passes, again = last_block_passes(fresh_t2v_pipe, steps)
    assert again_passes == passes
    np.testing.assert_array_equal(again, frames)


@pytest.mark.parametrize("cache", ["first_block", "taylorseer"])
def test_a_step_cache_runs_with_the_blocks_compiled_as_full_graphs(tiny_models, monkeypatch, cache):
    """compile=on (auto on CUDA) with a cache: the hooks decide outside the compiled forward. Dynamo's
    tracing is what failed here (a full graph cannot enter the hooks), and the "eager" backend runs
    the same tracing without inductor's minutes of code generation on a CPU."""
    from diffusers import WanPipeline

    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "eager")
    pipes = {}
    for compiled in (False, True):
        pipe = pipes[compiled] = WanPipeline.from_pretrained(tiny_models["t2v"])
        pipe.set_progress_bar_config(disable=True)
        applied = fastpath.apply_options(pipe, InferenceOptions(cache=cache, compile=compiled, cache_threshold=0.2), CPU)
        assert (applied["compile"], applied["cache"]) == ("on" if compiled else "off", cache)
    torch._dynamo.reset()
    try:
        for steps in (1, 6):  # 1: the worker's warm-up
            np.testing.assert_array_equal(
                generate_frames(pipes[True], request(steps)), generate_frames(pipes[False], request(steps))
            )
    finally:
        torch._dynamo.reset()
