"""Per-request flow shift and scheduler: they change the frames of that request only."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from inference.generate import GenerationRequest, generate_frames
from inference.sampling import SCHEDULERS, configured_shift, default_shift, make_scheduler


def small_request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a boat on the river at sunset", num_frames=5, height=32, width=32, infer_steps=3, seed=4)
    fields.update(overrides)
    return GenerationRequest(**fields)


@pytest.mark.parametrize("height, width, distilled, shift", [
    (480, 832, False, 3.0), (832, 480, False, 3.0), (64, 64, False, 3.0), (720, 1280, False, 5.0),
    (480, 848, False, 5.0), (480, 832, True, 5.0), (64, 64, True, 5.0),
])
def test_default_shift_is_3_up_to_480p_area_and_5_above_or_when_distilled(height, width, distilled, shift):
    assert default_shift(height, width, distilled=distilled) == shift


def test_scheduler_names_are_unipc_and_euler():
    assert SCHEDULERS == ("unipc", "euler")


def test_other_shift_changes_the_frames_and_the_next_default_request_is_unchanged(t2v_pipe):
    scheduler_before, config_before = t2v_pipe.scheduler, dict(t2v_pipe.config)
    default = generate_frames(t2v_pipe, small_request())
    shifted = generate_frames(t2v_pipe, small_request(sample_shift=8.0))
    other_shift = generate_frames(t2v_pipe, small_request(sample_shift=1.5))
    after = generate_frames(t2v_pipe, small_request())
    assert not np.array_equal(shifted, default) and not np.array_equal(shifted, other_shift)
    np.testing.assert_array_equal(after, default)
    assert t2v_pipe.scheduler is scheduler_before and dict(t2v_pipe.config) == config_before
    assert configured_shift(t2v_pipe.scheduler) == 3.0


def test_the_configured_shift_or_scheduler_named_explicitly_gives_the_default_frames(t2v_pipe):
    default = generate_frames(t2v_pipe, small_request())
    np.testing.assert_array_equal(generate_frames(t2v_pipe, small_request(sample_shift=3.0)), default)
    np.testing.assert_array_equal(generate_frames(t2v_pipe, small_request(scheduler="unipc")), default)


def test_euler_scheduler_runs_every_step_and_leaves_unipc_in_place(t2v_pipe):
    steps = []
    euler = generate_frames(t2v_pipe, small_request(scheduler="euler", sample_shift=5.0),
                            on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert not np.array_equal(euler, generate_frames(t2v_pipe, small_request(sample_shift=5.0)))
    assert isinstance(t2v_pipe.scheduler, UniPCMultistepScheduler)
    assert t2v_pipe.config["scheduler"][1] == "UniPCMultistepScheduler"


def test_a_run_that_fails_mid_way_still_restores_the_scheduler(i2v_pipe):
    from PIL import Image

    scheduler_before = i2v_pipe.scheduler

    def fail(step, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generate_frames(i2v_pipe, small_request(image=Image.new("RGB", (32, 32)), scheduler="euler"), on_step=fail)
    assert i2v_pipe.scheduler is scheduler_before


def test_make_scheduler_keeps_the_base_and_carries_its_settings():
    base = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=900)
    shifted = make_scheduler(base, None, 7.0)
    assert isinstance(shifted, UniPCMultistepScheduler) and shifted is not base
    assert (shifted.config.flow_shift, shifted.config.num_train_timesteps, base.config.flow_shift) == (7.0, 900, 3.0)
    euler = make_scheduler(base, "euler", None)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler)
    assert (euler.config.shift, euler.config.num_train_timesteps) == (3.0, 900)
    back = make_scheduler(euler, "unipc", None)
    assert back.config.use_flow_sigmas and back.config.prediction_type == "flow_prediction"
    assert back.config.flow_shift == 3.0


@pytest.mark.parametrize("overrides", [dict(scheduler="ddim"), dict(scheduler=""), dict(sample_shift=0),
                                       dict(sample_shift=-1.0), dict(sample_shift=float("inf")),
                                       dict(sample_shift=True)])
def test_request_rejects_unknown_scheduler_and_non_positive_shift(overrides):
    with pytest.raises(ValueError):
        small_request(**overrides)
