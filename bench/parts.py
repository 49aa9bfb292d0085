"""Time the two big GPU parts of one Wan2.1 request, one variant at a time, to choose defaults.

    python bench/parts.py [--config tiny|1.3b|14b] [--device auto|cpu|cuda] [--repeats N]
                          [--part all|attention|vae|vae-compile|vae-variants] [--profile]

(1) One transformer forward (one denoising step, no CFG) per attention backend that runs here
    (``native`` = torch SDPA's own choice, ``_native_cudnn``, ``_native_flash``,
    ``_native_efficient``, and ``flash`` / ``_flash_3`` / ``sage`` when installed), uncompiled.
(2) One VAE decode of the request's latents in float32 and bfloat16, each with cuDNN autotuning
    (``torch.backends.cudnn.benchmark``) off and on; with ``--part vae-compile`` instead, float32
    eager against ``torch.compile`` of the decoder; with ``--part vae-variants``, stock against
    :func:`inference.vae_speed.speed_up_decoder`'s changes one at a time and together, in float32,
    bfloat16 and float16, with each one's largest pixel difference (``--profile``: and the top CUDA
    kernels).

Random weights with the real shapes (``bench/inference.py``'s builders; the text encoder is not
needed: random prompt embeddings of its width stand in), random latents of the request's size
(1.3b: 480x832x81 -> 16x21x60x104 latents, 32,760 tokens). Each variant gets one untimed call
first (autotuning, allocator), then ``--repeats`` timed calls; the table gives the median, the
transformer's achieved TFLOP/s (attention + linear FLOPs counted below) and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # "import inference" must find the package, not bench/inference.py

import inference  # noqa: E402,F401  - before torch (libgomp spin count)
import torch  # noqa: E402

from inference.pipelines import resolve_device  # noqa: E402

ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage")
TEXT_TOKENS = 512
LATENT_CHANNELS = 16


def build_transformer_and_vae(config: str, device: torch.device, dtype: torch.dtype):
    """(transformer in ``dtype``, float32 vae, (height, width, frames)) with the config's shapes
    and random weights."""
    if config == "tiny":
        from inference.tiny import _build_components

        with torch.device(device):
            components = _build_components("t2v")
        return components["transformer"].to(dtype), components["vae"], (64, 64, 17)
    from bench.inference import DEFAULT_SIZES
    from bench.random_models import build_random_transformer, build_random_vae

    transformer = build_random_transformer(config, device, dtype)
    vae = build_random_vae(device)
    return transformer.eval(), vae.eval(), DEFAULT_SIZES[config]


def transformer_flop(transformer, tokens: int) -> float:
    """Matmul FLOPs of one forward: every linear layer on every token, plus self-attention
    (QK^T and PV: 4 * tokens^2 * inner dim per layer) and cross-attention over the text."""
    linear = sum(m.in_features * m.out_features for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    layers = transformer.config.num_layers
    attention = layers * 4 * inner * tokens * (tokens + TEXT_TOKENS)
    return 2.0 * linear * tokens + attention


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn()`` after one untimed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        fn()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            sync()
            seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(seconds), peak


def random_latents(size, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Random latents of a ``(height, width, frames)`` request, ``(1, 16, (frames - 1) // 4 + 1,
    height / 8, width / 8)``, drawn from ``generator`` (default: a fresh one seeded 0)."""
    height, width, frames = size
    shape = (1, LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)
    generator = generator or torch.Generator(device).manual_seed(0)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def attention_rows(transformer, size, device, dtype, repeats: int) -> list[str]:
    from inference.fastpath import _attention_backend_runs, _set_attention_backend

    generator = torch.Generator(device).manual_seed(0)
    latents = random_latents(size, device, dtype, generator)
    text = torch.randn((1, TEXT_TOKENS, transformer.config.text_dim), generator=generator, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = latents.shape[2] // p_t * latents.shape[3] // p_h * latents.shape[4] // p_w
    flop = transformer_flop(transformer, tokens)
    rows = [f"transformer forward, {tokens} tokens, {flop / 1e12:.1f} TFLOP (uncompiled)"]
    head_dim = transformer.config.attention_head_dim
    reference = None
    for backend in ATTENTION_BACKENDS:
        if backend != "native" and not _attention_backend_runs(backend, device, dtype, head_dim):
            rows.append(f"  {backend:20s} not usable here")
            continue
        if backend == "native":
            transformer.reset_attention_backend()
        else:
            _set_attention_backend(transformer, backend)

        def forward():
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                               return_dict=False)[0]

        try:
            seconds, peak = timed(forward, device, repeats)
            with torch.no_grad():
                output = forward().float()
        except Exception as exc:  # noqa: BLE001 - a backend that fails is a row, not the end
            rows.append(f"  {backend:20s} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        reference = output if reference is None else reference
        diff = (output - reference).abs().max().item()
        rows.append(f"  {backend:20s} {seconds:8.4f} s  {flop / seconds / 1e12:7.1f} TFLOP/s  "
                    f"peak {peak:6.1f} GiB  max |diff| vs native {diff:.4f}")
        del output
        gc.collect()
    transformer.reset_attention_backend()
    return rows


def vae_rows(vae, size, device, repeats: int, *, compiled: bool = False):
    """Yield the VAE decode table's rows as they are measured. ``compiled``: instead of the
    dtype x autotuning grid, float32 eager against ``torch.compile`` of the decoder (its first
    call, which compiles, is timed apart), with the largest pixel difference between the two."""
    height, width, frames = size
    latents = random_latents(size, device)
    yield f"VAE decode of {tuple(latents.shape)} latents -> {frames}x{height}x{width}"

    def decode():
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    if compiled:
        vae.to(dtype=torch.float32)
        seconds, peak = timed(decode, device, repeats)
        with torch.no_grad():
            eager = decode()
        yield f"  float32   eager                   {seconds:8.4f} s  peak {peak:6.1f} GiB"
        vae.decoder.compile()
        started = time.perf_counter()
        with torch.no_grad():
            output = decode()
        compile_s = time.perf_counter() - started
        seconds, peak = timed(decode, device, repeats)
        diff = (output - eager).abs().max().item() * 127.5  # [-1, 1] -> 0-255 levels
        yield (f"  float32   torch.compile(decoder)  {seconds:8.4f} s  peak {peak:6.1f} GiB  "
               f"first call {compile_s:.1f} s  max |diff| vs eager {diff:.3f} levels")
        return
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype=dtype)
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            seconds, peak = timed(decode, device, repeats)
            yield (f"  {str(dtype).removeprefix('torch.'):9s} cudnn.benchmark={str(autotune):5s} "
                   f"{seconds:8.4f} s  peak {peak:6.1f} GiB")
    torch.backends.cudnn.benchmark = False


VAE_VARIANTS = (  # (name, speed_up_decoder keyword arguments); the first is the reference
    ("stock", None),
    ("channels_last", dict(channels_last=True, lean_ops=False, lean_upsample=False, padded_inputs=False)),
    ("lean_ops", dict(channels_last=False, lean_ops=True, lean_upsample=False, padded_inputs=False)),
    ("channels_last+lean_ops", dict(channels_last=True, lean_ops=True, lean_upsample=False, padded_inputs=False)),
    ("channels_last+lean_ops+lean_upsample", dict(lean_upsample=True, padded_inputs=False)),
    ("channels_last+lean_ops+padded_inputs", dict(lean_upsample=False, padded_inputs=True)),
    ("vae_decode=fast", dict()),  # all four changes: what main runs on CUDA
    # float16 only: what vae_dtype=auto runs on CUDA (each chunk checked for overflow, one chunk late).
    ("vae_decode=fast+overflow_fallback", dict(overflow_fallback=True)),
)


def vae_variant_rows(vae, size, device, repeats: int, profile: bool = False):
    """Yield rows timing :func:`inference.vae_speed.speed_up_decoder`'s variants on copies of
    ``vae`` in float32, bfloat16 and float16 (10 mantissa bits to bfloat16's 7: nearer float32
    at bfloat16's speed, unless activations overflow), each with its largest pixel difference
    from the stock float32 decode (0-255 levels); ``profile``: then the top kernels of the stock
    and the fastest variant's decode in each dtype (torch.profiler, one decode each)."""
    import copy

    from inference.vae_speed import fall_back_to_float32_on_overflow, speed_up_decoder

    height, width, frames = size
    latents = random_latents(size, device)
    yield f"VAE decode variants (inference/vae_speed.py) of {tuple(latents.shape)} latents -> {frames}x{height}x{width}"
    reference = None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        fastest = None
        for name, changes in VAE_VARIANTS:
            changes = dict(changes) if changes is not None else None
            overflow_fallback = changes.pop("overflow_fallback", False) if changes is not None else False
            if overflow_fallback and dtype != torch.float16:
                continue
            variant = copy.deepcopy(vae).to(dtype=dtype)
            if changes is not None:
                speed_up_decoder(variant, **changes)
            if overflow_fallback:
                fall_back_to_float32_on_overflow(variant)

            def decode(variant=variant):
                return variant.decode(latents.to(dtype), return_dict=False)[0]

            try:
                seconds, peak = timed(decode, device, repeats)
                with torch.no_grad():
                    output = decode().float()
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a row
                yield f"  {str(dtype).removeprefix('torch.'):9s} {name:40s} failed: {type(exc).__name__}: {str(exc)[:160]}"
                continue
            reference = output if reference is None else reference
            diff = (output - reference).abs().max().item() * 127.5
            yield (f"  {str(dtype).removeprefix('torch.'):9s} {name:40s} {seconds:8.4f} s  peak {peak:6.1f} GiB  "
                   f"max |diff| vs float32 stock {diff:.3f} levels")
            if fastest is None or seconds < fastest[0]:
                fastest = (seconds, name, decode)
            if name == "stock":
                stock_decode = decode
            del output
        if profile and device.type == "cuda":
            for name, decode in (("stock", stock_decode), (fastest[1], fastest[2])):
                yield f"  profile, {str(dtype).removeprefix('torch.')} {name}:"
                yield from _profile_rows(decode)
        del variant
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _profile_rows(fn, limit: int = 14):
    """The ``limit`` kernels with the most device time in one call of ``fn``, as table rows."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=limit, max_name_column_width=70)
    for line in table.splitlines():
        yield "    " + line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "1.3b", "14b"), help="default: tiny on CPU, 1.3b on CUDA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--part", choices=("all", "attention", "vae", "vae-compile", "vae-variants"), default="all",
                        help="all: attention and vae; vae-compile (slow: compiles the decoder) only when named")
    parser.add_argument("--profile", action="store_true", help="vae-variants: also the top kernels (CUDA)")
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args.device)
    config = args.config or ("1.3b" if device.type == "cuda" else "tiny")
    if config != "tiny" and device.type != "cuda":
        parser.error(f"--config {config} needs a CUDA device")
    transformer, vae, size = build_transformer_and_vae(config, device, dtype)
    if args.part in ("vae-variants", "vae-compile"):
        transformer = None  # not needed: free its memory before the decodes
    print(f"Wan2.1 {config} parts on {device} ({str(dtype).removeprefix('torch.')}), "
          f"medians of {args.repeats} after one untimed call", flush=True)
    if args.part in ("all", "attention"):
        print("\n".join(attention_rows(transformer, size, device, dtype, args.repeats)), flush=True)
    if args.part != "attention":
        del transformer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.part == "vae-variants":
            rows = vae_variant_rows(vae, size, device, args.repeats, profile=args.profile)
        else:
            rows = vae_rows(vae, size, device, args.repeats, compiled=args.part == "vae-compile")
        for row in rows:
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
