"""resolve_device and load_pipeline: device choice, caching, clear load errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from inference import pipelines
from inference.pipelines import ModelLoadError, load_count, load_pipeline, resolve_device


def test_cpu_preference_gives_cpu_float32():
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)


def test_auto_without_cuda_gives_cpu_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == (torch.device("cpu"), torch.float32)


def test_auto_with_cuda_gives_cuda_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)


def test_explicit_cuda_device_gives_bfloat16():
    assert resolve_device("cuda:1") == (torch.device("cuda:1"), torch.bfloat16)


@pytest.mark.parametrize("preference", ["gpu", "mps", "", "cuda:x"])
def test_unknown_device_preference_is_rejected(preference):
    with pytest.raises(ValueError):
        resolve_device(preference)


def test_second_load_returns_cached_pipeline_without_loading_again(tiny_models):
    first = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu")
    loads_before = load_count()
    again = load_pipeline(str(tiny_models["t2v"]) + os.sep, kind="t2v", device="cpu")
    assert again is first
    assert load_count() == loads_before


def test_cached_pipeline_is_on_cpu_in_float32_with_progress_bar_off(t2v_pipe):
    assert t2v_pipe.device == torch.device("cpu")
    assert t2v_pipe.transformer.dtype == torch.float32
    assert t2v_pipe._progress_bar_config.get("disable") is True


def test_i2v_kind_loads_image_to_video_pipeline(i2v_pipe):
    from diffusers import WanImageToVideoPipeline

    assert isinstance(i2v_pipe, WanImageToVideoPipeline)


def test_clearing_the_cache_makes_the_next_call_load_again(tiny_models, monkeypatch):
    monkeypatch.setattr(pipelines, "_cache", {})  # keep the session-wide cache intact
    loads_before = load_count()
    load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu")
    pipelines.clear_pipeline_cache()
    load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu")
    assert load_count() == loads_before + 2


def test_missing_directory_raises_model_load_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_pipeline(missing, kind="t2v", device="cpu")


def test_directory_without_model_index_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path, kind="t2v", device="cpu")


def test_non_wan_pipeline_raises_model_load_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusionPipeline"):
        load_pipeline(tmp_path, kind="t2v", device="cpu")


def test_t2v_directory_requested_as_i2v_raises_model_load_error(tiny_models):
    with pytest.raises(ModelLoadError, match="WanImageToVideoPipeline"):
        load_pipeline(tiny_models["t2v"], kind="i2v", device="cpu")


def test_broken_component_raises_model_load_error(tiny_models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["t2v"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelLoadError, match="broken"):
        load_pipeline(broken, kind="t2v", device="cpu")


def test_unknown_kind_is_rejected(tiny_models):
    with pytest.raises(ValueError, match="kind"):
        load_pipeline(tiny_models["t2v"], kind="v2v", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_request_without_cuda_fails_before_loading(tiny_models):
    loads_before = load_count()
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_pipeline(tiny_models["t2v"], kind="t2v", device="cuda")
    assert load_count() == loads_before


def test_importing_the_package_loads_neither_torch_nor_diffusers():
    code = (
        "import sys, inference\n"
        "inference.GenerationRequest(prompt='p'); inference.frames_for_duration(5)\n"
        "heavy = {'torch', 'diffusers', 'av'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


@pytest.mark.parametrize(
    "operator_env, expected",
    [({}, "10000"), ({"GOMP_SPINCOUNT": "500"}, "500"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_the_package_shortens_libgomp_spinning_unless_the_operator_chose(operator_env, expected):
    env = {name: value for name, value in os.environ.items() if name not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, inference; print(os.environ.get('GOMP_SPINCOUNT'))"
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root, env={**env, **operator_env},
                            capture_output=True, text=True)  # fmt: skip
    assert result.stdout.strip() == str(expected)


def test_a_bfloat16_pipeline_reads_its_float32_vae_without_rounding_it(tiny_models, monkeypatch):
    """On CUDA the pipeline loads in bfloat16; the VAE must keep the checkpoint's float32 weights
    (options.vae_dtype), not bfloat16-rounded ones cast back up. Simulated on the CPU in bfloat16."""
    from diffusers import AutoencoderKLWan

    from inference.options import InferenceOptions

    monkeypatch.setattr(pipelines, "resolve_device", lambda preference: (torch.device("cpu"), torch.bfloat16))
    monkeypatch.setattr(pipelines, "_cache", {})  # this bfloat16 CPU pipe must not serve later tests
    pipe = load_pipeline(tiny_models["t2v"], kind="t2v", device="cpu", options=InferenceOptions())
    stored = AutoencoderKLWan.from_pretrained(tiny_models["t2v"] / "vae", dtype=torch.float32).state_dict()
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    loaded = pipe.vae.state_dict()
    assert stored.keys() == loaded.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in stored.items())
    assert any(not torch.equal(tensor.bfloat16().float(), tensor) for tensor in stored.values())  # rounding shows
