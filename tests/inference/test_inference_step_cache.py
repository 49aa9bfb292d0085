"""The step caches (``cache`` = first_block | taylorseer): they skip transformer work, change the
frames, start afresh on every run, and run inside a full-graph compile of the blocks."""

import numpy as np
import pytest
import torch

from inference import fastpath
from inference.generate import GenerationRequest, generate_frames
from inference.options import InferenceOptions

CPU = torch.device("cpu")


def request(steps: int, step_cache: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt="a cat", num_frames=5, height=32, width=32, infer_steps=steps, seed=3, step_cache=step_cache
    )


def last_block_passes(pipe, steps: int, step_cache: str | None = None) -> tuple[int, np.ndarray]:
    """How often the last transformer block computed during one ``steps``-step run, and its frames."""
    passes = []
    hook = pipe.transformer.blocks[-1].attn1.register_forward_pre_hook(lambda *args: passes.append(1))
    try:
        frames = generate_frames(pipe, request(steps, step_cache))
    finally:
        hook.remove()
    return len(passes), frames


@pytest.mark.parametrize(
    "steps, computed",
    [(4, 3), (12, 5)],  # steps 0-2, then every fifth from step 4: 0 1 2 (3 predicted) / 0 1 2 4 9
)
def test_taylorseer_computes_its_schedule_and_extrapolates_the_other_steps(fresh_t2v_pipe, t2v_pipe, steps, computed):
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="taylorseer", text_cache_size=0), CPU)
    assert lossy_and_repeatable_passes(fresh_t2v_pipe, t2v_pipe, steps) == computed


def test_first_block_cache_skips_the_later_blocks_on_similar_steps(fresh_t2v_pipe, t2v_pipe):
    steps = 12
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="first_block", cache_threshold=0.2), CPU)
    assert 1 <= lossy_and_repeatable_passes(fresh_t2v_pipe, t2v_pipe, steps) < steps


def lossy_and_repeatable_passes(cached_pipe, plain_pipe, steps: int) -> int:
    """The last block's passes in a ``steps``-step run of ``cached_pipe``, after checking that its
    frames differ from ``plain_pipe``'s and that a second run computes and returns the same."""
    passes, frames = last_block_passes(cached_pipe, steps)
    assert not np.array_equal(frames, generate_frames(plain_pipe, request(steps)))  # lossy: the skipped steps
    again_passes, again = last_block_passes(cached_pipe, steps)  # the cache state starts afresh each run
    assert again_passes == passes
    np.testing.assert_array_equal(again, frames)
    return passes


def test_a_request_names_its_step_cache_and_the_pipelines_default_comes_back(fresh_t2v_pipe, t2v_pipe):
    steps = 12
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="first_block", cache_threshold=0.2), CPU)
    default_passes, default_frames = last_block_passes(fresh_t2v_pipe, steps)
    assert last_block_passes(fresh_t2v_pipe, steps, "taylorseer")[0] == 5
    passes, frames = last_block_passes(fresh_t2v_pipe, steps, "none")
    assert passes == steps
    np.testing.assert_array_equal(frames, generate_frames(t2v_pipe, request(steps)))  # no cache: stock frames
    again_passes, again = last_block_passes(fresh_t2v_pipe, steps)  # None: the loaded default again
    assert again_passes == default_passes < steps
    np.testing.assert_array_equal(again, default_frames)
    assert last_block_passes(t2v_pipe, steps, "first_block")[0] < steps  # on a pipe loaded without one
    assert last_block_passes(t2v_pipe, steps)[0] == steps


def test_a_failed_run_still_puts_the_default_step_cache_back(fresh_t2v_pipe):
    fastpath.apply_options(fresh_t2v_pipe, InferenceOptions(cache="taylorseer", text_cache_size=0), CPU)

    def fail(step: int, total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generate_frames(fresh_t2v_pipe, request(4, "none"), on_step=fail)
    assert last_block_passes(fresh_t2v_pipe, 4)[0] == 3


def test_an_unknown_step_cache_is_refused():
    with pytest.raises(ValueError, match="step_cache must be one of none, first_block, taylorseer"):
        request(4, "teacache")


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
        # 1 step: the worker's warm-up; then a request that names no cache, so its hooks come off and back.
        for steps, step_cache in ((1, None), (6, None), (6, "none"), (6, None)):
            np.testing.assert_array_equal(
                generate_frames(pipes[True], request(steps, step_cache)),
                generate_frames(pipes[False], request(steps, step_cache)),
            )
        with fastpath.step_cache_applied(pipes[True].transformer, "none"):  # the hooks come off the compiled forward
            assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in pipes[True].transformer.blocks)
    finally:
        torch._dynamo.reset()
