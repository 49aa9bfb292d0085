"""Fixtures for the inference package tests: a tiny random Wan model pair, built once.

Plain pytest, no Django: run with ``pytest tests/inference -p no:django``.
"""

import pytest

from inference.pipelines import load_pipeline
from inference.tiny import build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``{"t2v": path, "i2v": path}`` of tiny Wan pipelines saved in a session temp dir."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="session")
def t2v_pipe(tiny_models):
    return load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu")


@pytest.fixture(scope="session")
def i2v_pipe(tiny_models):
    return load_pipeline(tiny_models["i2v"], kind="i2v", device="cpu")


@pytest.fixture(scope="session", autouse=True)
def tiny_model_dirs():
    """Shadow the Django suite's autouse fixture of this name (tests/conftest.py).

    It reads Django settings, which do not exist under ``-p no:django``; these tests build
    their own models through ``tiny_models`` instead.
    """
    return None


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_models):
    """A LoRA directory with two tiny LoRAs for the tiny Wan models: ``alpha`` and ``beta``."""
    from inference.tiny import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    build_tiny_lora(tiny_models["t2v"], root / "alpha.safetensors", seed=1)
    build_tiny_lora(tiny_models["t2v"], root / "beta.safetensors", seed=2)
    return root


@pytest.fixture()
def fresh_t2v_pipe(tiny_models):
    """A T2V pipeline of its own (not the cached one): state changes die with the test."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_models["t2v"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def fresh_i2v_pipe(tiny_models):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_models["i2v"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def third_frame_conversion_fails(monkeypatch):
    """The MP4 encoder's third frame conversion raises ``RuntimeError("disk on fire")``, mid-encode."""
    from inference import encode as encode_module

    real_from_ndarray = encode_module.av.VideoFrame.from_ndarray
    calls = []

    def failing_from_ndarray(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_from_ndarray(*args, **kwargs)

    monkeypatch.setattr(encode_module.av.VideoFrame, "from_ndarray", failing_from_ndarray)
