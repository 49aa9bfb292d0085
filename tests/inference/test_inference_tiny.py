"""build_tiny_models: layout, idempotence, determinism."""

import json

from inference.tiny import build_tiny_models


def test_builds_t2v_and_i2v_wan_pipelines(tiny_models):
    assert set(tiny_models) == {"t2v", "i2v"}
    class_names = {kind: json.loads((path / "model_index.json").read_text())["_class_name"]
                   for kind, path in tiny_models.items()}
    assert class_names == {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}


def test_second_build_reuses_existing_models(tiny_models):
    index = tiny_models["t2v"] / "model_index.json"
    mtime_before = index.stat().st_mtime_ns
    assert build_tiny_models(tiny_models["t2v"].parent) == tiny_models
    assert index.stat().st_mtime_ns == mtime_before


def test_builds_are_deterministic_and_force_rebuilds(tmp_path, tiny_models):
    rebuilt = build_tiny_models(tmp_path, force=True)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    for kind in ("t2v", "i2v"):
        assert (rebuilt[kind] / weights).read_bytes() == (tiny_models[kind] / weights).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i2v", "t2v"]  # no staging dirs left
