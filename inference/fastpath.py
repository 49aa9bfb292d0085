"""Apply :class:`~inference.options.InferenceOptions` to a loaded Wan pipeline, once.

Each option resolves ``auto`` against the device it runs on and reports what it chose, so
logs and run statistics say what actually ran (e.g. ``attention_backend: native``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from .options import InferenceOptions

logger = logging.getLogger(__name__)

# Tried in this order by attention_backend="auto" on CUDA (all exact, no quantisation); when none
# runs, "native": torch's SDPA picks its own kernel, which on an H200 with torch 2.11 was cuDNN's and
# 3 % faster than diffusers' explicit "_native_cudnn" (0.63 against 0.65 s for one 1.3B forward at
# 480x832x81; "_native_flash" 0.85 s; bench/parts.py, bench/README.md).
AUTO_CUDA_ATTENTION_BACKENDS = ("_flash_3", "flash")
# vae_tiling="auto" turns tiling on below this much free device memory after the load: a
# float32 Wan VAE decode of 81 frames at 1280x720 peaks at roughly this much (estimate).
VAE_TILING_AUTO_MIN_FREE_BYTES = 24 * 2**30

_VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.compile backend of compile=on; tests swap in "eager" to check what dynamo traces in seconds.
COMPILE_BACKEND = "inductor"


class OptionNotUsable(RuntimeError):
    """An explicitly requested option cannot run on this device or installation."""


def apply_options(pipe, options: InferenceOptions, device: torch.device) -> dict[str, str]:
    """Configure ``pipe`` (already on ``device``) for ``options``; return what was chosen.

    This is everything :func:`~inference.pipelines.load_pipeline` does beyond loading, so a
    pipeline built another way (e.g. a benchmark's random weights) gets the same fast path.
    It also gives ``pipe`` a prompt-embedding cache of ``options.text_cache_size``.
    The result has one string per option field, ``auto`` resolved (e.g. ``{"compile": "off",
    "attention_backend": "native", ...}``). Raises :class:`OptionNotUsable` when an explicit
    choice cannot run (e.g. ``flash`` without flash-attn, any CUDA kernel on CPU). Defaults
    change nothing on CPU, so frames stay identical to the stock pipeline there.
    """
    from .prompt_cache import attach_prompt_cache

    transformer = pipe.transformer
    applied = options.as_strings()
    applied["attention_backend"] = _apply_attention_backend(transformer, options.attention_backend, device)
    applied["vae_dtype"] = _apply_vae_dtype(pipe.vae, options.vae_dtype, device)
    applied["vae_tiling"] = _apply_vae_tiling(pipe.vae, options.vae_tiling, device)
    applied["vae_decode"] = _apply_vae_decode(pipe.vae, options.vae_decode, device)
    applied["fp8"] = _apply_fp8(transformer, options.fp8, device)
    # Compile after the attention backend and FP8 are final, and before the cache hooks, which must
    # stay outside the compiled graph (see _apply_compile).
    applied["compile"] = _apply_compile(transformer, options.compile, device, fp8=options.fp8)
    applied["cache"] = _install_step_cache(transformer, options.cache, options.cache_threshold)
    attach_prompt_cache(pipe, options.text_cache_size)
    return applied


def _apply_attention_backend(transformer, choice: str, device: torch.device) -> str:
    if choice == "auto":
        if device.type != "cuda":
            return "native"  # leave the diffusers default untouched: identical frames
        head_dim = transformer.config.attention_head_dim
        for backend in AUTO_CUDA_ATTENTION_BACKENDS:
            if _attention_backend_runs(backend, device, transformer.dtype, head_dim):
                _set_attention_backend(transformer, backend)
                return backend
        return "native"
    if not _attention_backend_runs(choice, device, transformer.dtype, transformer.config.attention_head_dim):
        raise OptionNotUsable(
            f"attention backend {choice!r} cannot run on {device} with {transformer.dtype} "
            "(missing package, unsupported GPU, or a CUDA-only kernel on CPU)"
        )
    _set_attention_backend(transformer, choice)
    return choice


def _attention_backend_runs(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Run one small attention call through ``backend``; False if it is missing or fails."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    try:
        name = AttentionBackendName(backend)
        _check_attention_backend_requirements(name)
        # (batch, sequence, heads, head_dim): the layout diffusers' dispatcher takes.
        query = torch.randn(1, 64, 2, head_dim, device=device, dtype=dtype)
        with torch.no_grad():
            dispatch_attention_fn(query, query, query, backend=name)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        logger.debug("attention backend %s not usable on %s: %s", backend, device, exc)
        return False


def _set_attention_backend(transformer, backend: str) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also changes the process-wide default, which would silently
    # switch every other diffusers model; each processor keeps its own copy, so restore it.
    process_default = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry.set_active_backend(process_default)


def resolve_vae_dtype(choice: str, device: torch.device) -> str:
    """``vae_dtype`` with ``auto`` resolved: float16 on CUDA (guarded against overflow), else float32."""
    if choice == "auto":
        return "float16" if device.type == "cuda" else "float32"
    return choice


def component_dtypes(dtype: torch.dtype, options: InferenceOptions, device: torch.device) -> dict[str, torch.dtype]:
    """``from_pretrained``'s per-component ``dtype``: ``dtype`` for every component but the VAE,
    which is read in ``options.vae_dtype`` (resolved for ``device``), so that a float32 VAE is
    never rounded to the pipeline's bfloat16 on the way (``_apply_vae_dtype`` then has nothing
    to change)."""
    return {"default": dtype, "vae": _VAE_DTYPES[resolve_vae_dtype(options.vae_dtype, device)]}


def _apply_vae_dtype(vae, choice: str, device: torch.device) -> str:
    choice = resolve_vae_dtype(choice, device)
    dtype = _VAE_DTYPES[choice]
    if vae.dtype != dtype:
        vae.to(dtype=dtype)  # the pipelines cast latents to vae.dtype before decoding
    if dtype == torch.float16:
        from .vae_speed import fall_back_to_float32_on_overflow

        fall_back_to_float32_on_overflow(vae)
    return choice


def _apply_vae_tiling(vae, choice: str, device: torch.device) -> str:
    if choice == "auto":
        enabled = device.type == "cuda" and _free_device_bytes(device) < VAE_TILING_AUTO_MIN_FREE_BYTES
    else:
        enabled = choice == "on"
    if enabled:
        vae.enable_tiling()
    return "on" if enabled else "off"


def _apply_vae_decode(vae, choice: str, device: torch.device) -> str:
    if choice == "auto":
        choice = "fast" if device.type == "cuda" else "stock"  # stock on CPU: identical frames
    if choice == "fast":
        from .vae_speed import speed_up_decoder

        speed_up_decoder(vae)
    return choice


def _free_device_bytes(device: torch.device) -> int:
    free_bytes, _total = torch.cuda.mem_get_info(device)
    return free_bytes


def _install_step_cache(transformer, kind: str, threshold: float) -> str:
    """Put ``kind``'s hooks on ``transformer`` (replacing any step cache it has) and record the pair
    as its default, which :func:`step_cache_applied` returns to after a run that names another."""
    if getattr(transformer, "_cache_config", None) is not None:
        transformer.disable_cache()
    if kind == "first_block":
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    elif kind == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig

        # Lite mode: on a predicted step every block is skipped and proj_out's output extrapolated.
        # The default patterns ("^blocks.*attn") match no module of Wan's ("blocks.0.attn1"), so they
        # hooked nothing and changed nothing; caching each attention's output instead would keep ~18
        # GiB of Taylor factors for the 1.3B model at 480x832x81.
        transformer.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
    transformer._lightx2v_step_cache = (kind, threshold)
    return kind


def default_step_cache(transformer) -> tuple[str, float]:
    """``(kind, threshold)`` of the step cache ``transformer`` runs with when a request names none:
    the ``cache`` options :func:`apply_options` installed, else no cache."""
    return getattr(transformer, "_lightx2v_step_cache", (InferenceOptions.cache, InferenceOptions.cache_threshold))


@contextlib.contextmanager
def step_cache_applied(transformer, kind: str | None):
    """Run the block with ``kind``'s step cache (None: the transformer's default, see
    :func:`default_step_cache`); the default's hooks are back afterwards, also after an error.
    Swapping hooks is cheap and leaves compiled blocks compiled (they sit inside the hooks)."""
    default_kind, threshold = default_step_cache(transformer)
    if kind is None or kind == default_kind:
        yield
        return
    _install_step_cache(transformer, kind, threshold)
    try:
        yield
    finally:
        _install_step_cache(transformer, default_kind, threshold)


# What fp8="compute" needs: FP8 tensor cores (compute capability 8.9: Ada, Hopper and later).
FP8_COMPUTE_MIN_CAPABILITY = (8, 9)


def _apply_fp8(transformer, choice: str, device: torch.device) -> str:
    if choice == "storage":
        # diffusers' own skip list keeps patch embedding, condition embedder and norms as they are.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)
    elif choice == "compute":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_COMPUTE_MIN_CAPABILITY:
            raise OptionNotUsable(f"fp8=compute needs a CUDA GPU of compute capability 8.9 or later, not {device}")
        if importlib.util.find_spec("torchao") is None:
            raise OptionNotUsable("fp8=compute needs torchao (pip install torchao)")
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(transformer.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return choice


def match_lora_dtype(transformer) -> None:
    """Cast LoRA weights loaded into an ``fp8="storage"`` transformer to its compute dtype.

    PEFT creates them in their base layer's dtype, FP8 there, which has no matmul; the base layers
    keep their layerwise casting. Without layerwise casting this changes nothing.
    """
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    compute_dtype = None
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            compute_dtype = hook.compute_dtype
            break
    if compute_dtype is None:
        return
    for name, parameter in transformer.named_parameters():
        if ".lora_" in name and parameter.dtype == torch.float8_e4m3fn:
            parameter.data = parameter.data.to(compute_dtype)


def _apply_compile(transformer, choice: bool | None, device: torch.device, fp8: str = "off") -> str:
    """Compile each repeated transformer block's ``forward`` as one full graph (regional compile).

    The ``forward``, not the module's call as ``compile_repeated_blocks`` does: step-cache hooks
    (installed at load or per request, see :func:`step_cache_applied`) then wrap the compiled
    forward from outside, and their step counting and data-dependent skips run eagerly. Compiling
    the call traced into those hooks, where a full graph cannot go (diffusers marks their decisions
    ``torch.compiler.disable``): every generation with a cache failed. All blocks share one graph.
    """
    # fp8="storage" casts each layer's weights inside its forward (module.to), which a full graph cannot hold.
    if choice and fp8 == "storage":
        raise OptionNotUsable("compile=on cannot be combined with fp8=storage (use fp8=compute, or compile=auto)")
    if choice is None:
        # Inductor's GPU code generation needs triton; without it compile would fail on first use.
        choice = device.type == "cuda" and importlib.util.find_spec("triton") is not None and fp8 != "storage"
    if choice:
        for block in repeated_blocks(transformer):
            block.forward = torch.compile(block.forward, fullgraph=True, backend=COMPILE_BACKEND)
    return "on" if choice else "off"


_recompile_limit_hit = False  # this process's compiled blocks used up dynamo's recompile limit


def plain_run_stance() -> str:
    """The ``torch.compiler`` stance of a run without LoRA: compile a graph where one is needed, or
    (once the recompile limit was hit in this process) run eagerly where no compiled graph fits."""
    return "eager_on_recompile" if _recompile_limit_hit else "default"


def past_the_recompile_limit(run):
    """``run()``; when compiled blocks hit dynamo's recompile limit (a hard error under ``fullgraph``),
    every later plain run (:func:`plain_run_stance`) and this one, started again, go eager where no
    graph fits instead of failing: each set of layers LoRAs wrapped, each pipeline and video size
    needed a graph of its own, and all blocks share the limit."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    global _recompile_limit_hit
    try:
        return run()
    except FailOnRecompileLimitHit:
        if _recompile_limit_hit:
            raise
        _recompile_limit_hit = True
        logger.warning("compiled transformer blocks hit the recompile limit: new shapes and LoRA layers run eagerly")
        return run()


def repeated_blocks(transformer) -> list[torch.nn.Module]:
    """The modules ``compile_repeated_blocks`` compiles: those of a class named in ``_repeated_blocks``."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return [module for module in transformer.modules() if type(module).__name__ in names]
