"""Build a tiny, random-weight Wan2.1 T2V + I2V pipeline pair offline.

The pair has the exact on-disk layout of real Wan2.1 diffusers directories, so it loads
through :func:`inference.pipelines.load_pipeline` like the real models do. Used by tests
and by local development without GPUs or downloaded weights.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

logger = logging.getLogger(__name__)

# Words that make typical prompts tokenize into real pieces instead of <unk>. Single
# characters back them up so any ASCII prompt still gets distinct token ids.
_WORDS = (
    "a an the of in on at with and to from by is are over under into through near "
    "cat dog bird fish horse person man woman child car boat train city street forest "
    "beach ocean sea river lake mountain sky cloud sun moon star rain snow fire light "
    "sunset sunrise night day red blue green yellow white black orange purple golden "
    "runs walks flies swims jumps dances moving slowly fast camera shot close-up wide "
    "video cinematic realistic beautiful high quality detailed low bad blurry static"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"

_KINDS = ("t2v", "i2v")


def build_tiny_tokenizer():
    """A T5Tokenizer with a tiny unigram vocab (pad, </s>, unk first, as T5 expects).

    Its ids (< 200) are valid for any larger T5/UMT5 vocabulary too, so benchmarks can pair it
    with a full-size random text encoder.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -20.0)]
    vocab += [("\u2581" + word, -float(rank + 1)) for rank, word in enumerate(_WORDS)]
    vocab += [(char, -30.0) for char in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _build_components(kind: str) -> dict:
    """Pipeline components for ``kind``; weights come from the caller's seeded RNG."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).eval()  # without eval() dropout makes the prompt embedding random
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    i2v = kind == "i2v"
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36 if i2v else 16,  # I2V also gets the 16 + 4 mask channels of the condition
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # Must cover the largest latent side in patches: 832 px / 8 (VAE) / 2 (patch) = 52.
        rope_max_seq_len=1024,
        image_dim=4 if i2v else None,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    components = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    if i2v:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        try:  # transformers 5 without torchvision: CLIPImageProcessor falls back to this, noisily
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        components["image_encoder"] = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=4,
                projection_dim=4,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=1,
            )
        ).eval()
        components["image_processor"] = CLIPImageProcessor(crop_size=32, size=32)
    return components


def _is_built(path: pathlib.Path) -> bool:
    return (path / "model_index.json").is_file()


def _save_atomically(pipe, target: pathlib.Path) -> None:
    """Save into a sibling temp dir, then rename, so ``target`` is never half-written.

    (save_pretrained writes model_index.json first, so an interrupted in-place save would
    look complete to :func:`_is_built`.)
    """
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same build first; keep theirs.
            if not _is_built(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_models(out_dir: str | os.PathLike, *, force: bool = False) -> dict[str, pathlib.Path]:
    """Write a tiny random Wan T2V pipeline to ``out_dir/t2v`` and I2V to ``out_dir/i2v``.

    Deterministic: the same diffusers/transformers versions produce the same weights.
    Idempotent: if both directories already hold a ``model_index.json`` nothing is rebuilt,
    unless ``force`` is true. The caller's global torch RNG state is left untouched.
    Returns ``{"t2v": path, "i2v": path}`` (absolute paths).
    """
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    root = pathlib.Path(out_dir).resolve()
    paths = {kind: root / kind for kind in _KINDS}
    if not force and all(_is_built(path) for path in paths.values()):
        logger.debug("tiny Wan models already present in %s", root)
        return paths

    root.mkdir(parents=True, exist_ok=True)
    pipeline_classes = {"t2v": WanPipeline, "i2v": WanImageToVideoPipeline}
    for kind in _KINDS:
        # Seed each kind separately so either one is reproducible on its own.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = pipeline_classes[kind](**_build_components(kind))
        _save_atomically(pipe, paths[kind])
        logger.info("built tiny Wan %s pipeline in %s", kind, paths[kind])
    return paths


# PEFT-format LoRA targets of each transformer block. attn2's key/value projections are
# left out: diffusers would pad them for I2V transformers with add_k_proj/add_v_proj LoRAs,
# layers the tiny I2V model does not have (it would warn about unexpected keys).
TINY_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")


def build_tiny_lora(
    model: object,
    out_path: str | os.PathLike,
    *,
    seed: int,
    rank: int = 4,
    scale: float = 1.0,
) -> pathlib.Path:
    """Write a random LoRA for a Wan transformer to ``out_path`` (a ``.safetensors`` file).

    ``model`` is a Wan pipeline, its transformer, or a pipeline directory (only
    ``transformer/config.json`` is read); the T2V and I2V tiny models share block shapes, so
    one file fits both. Keys are diffusers' PEFT format,
    ``transformer.blocks.{i}.{target}.lora_A.weight`` (rank × in) and ``lora_B.weight``
    (out × rank), for :data:`TINY_LORA_TARGETS` of every block. Unlike a freshly trained LoRA,
    ``B`` is not zero: the delta ``B @ A`` has entries of the size of the base weights times
    ``scale``, so different seeds visibly change the output. Deterministic per seed; the global
    torch RNG is untouched. Written atomically (temp file + rename). Returns the absolute path.
    """
    import json

    import torch
    from safetensors.torch import save_file

    config = _transformer_config(model)
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    for block in range(config["num_layers"]):
        for target in TINY_LORA_TARGETS:
            prefix = f"transformer.blocks.{block}.{target}"
            # Every target maps inner_dim -> inner_dim (attn2's query and output included).
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inner_dim, generator=generator) / inner_dim**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(inner_dim, rank, generator=generator) * (
                scale / rank**0.5)

    from .encode import atomic_output

    target_path = pathlib.Path(out_path).resolve()
    with atomic_output(target_path) as tmp_name:
        save_file(tensors, tmp_name, metadata={"built_by": "inference.tiny.build_tiny_lora",
                                               "seed": json.dumps(seed), "rank": json.dumps(rank)})
    return target_path


def _transformer_config(model: object) -> dict:
    """The Wan transformer config of a pipeline, a transformer, or a pipeline directory."""
    import json

    transformer = getattr(model, "transformer", model)
    config = getattr(transformer, "config", None)
    if config is not None:
        return dict(config)
    return json.loads((pathlib.Path(model) / "transformer" / "config.json").read_text())
