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
