"""Speed options applied once when a pipeline is loaded (see :func:`inference.pipelines.load_pipeline`).

Plain data, no torch import: settings code can build and validate options from strings
(e.g. environment variables) without loading anything heavy. The defaults are the lossless
ones: on CPU they give exactly the frames the stock pipeline gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

# "auto" picks the fastest lossless backend that works on the device (see inference.fastpath).
ATTENTION_BACKENDS = ("auto", "native", "_native_cudnn", "_native_flash", "_flash_3", "flash", "sage")
CACHE_KINDS = ("none", "first_block", "taylorseer")
VAE_TILING_MODES = ("auto", "on", "off")
VAE_DTYPES = ("auto", "float32", "bfloat16", "float16")
VAE_DECODE_MODES = ("auto", "fast", "stock")
FP8_MODES = ("off", "storage", "compute")

_TRUE_WORDS = ("on", "1", "true", "yes")
_FALSE_WORDS = ("off", "0", "false", "no")


@dataclass(frozen=True)
class InferenceOptions:
    """How a loaded pipeline trades load time, memory and quality for speed.

    Fields (string values in brackets are what :meth:`from_strings` accepts):

    ``attention_backend`` [auto | native | _native_cudnn | _native_flash | _flash_3 | flash | sage]:
        diffusers attention backend of the transformer. ``auto``: on CUDA the first that runs
        on the device of flash-attn 3 and flash-attn 2, else native (torch SDPA's own choice: cuDNN
        on Hopper); on CPU native. ``sage`` (int8 Q/K) is never chosen by ``auto`` because it
        changes the output. An explicit backend that cannot run fails the load.
    ``compile`` [auto | on | off]: regional ``torch.compile`` of the repeated transformer blocks
        (each block's ``forward`` one full graph). ``None`` (auto): on for CUDA when triton is
        importable, off on CPU. The first call per input shape compiles (tens of seconds); call
        :func:`inference.generate.warm_up` before serving.
    ``cache`` [none | first_block | taylorseer]: step-to-step transformer caching, for runs whose
        request names no ``step_cache`` (:class:`inference.generate.GenerationRequest`). Lossy, so
        off by default. ``first_block`` (First Block Cache): a step whose first block's output changed
        by less than ``cache_threshold`` (relative) skips the other blocks and reuses their last
        residual. ``taylorseer`` (lite mode): steps 0-2 and every fifth from step 4 (4, 9, 14, ...)
        run the transformer, the others skip every block and extrapolate its output from the last
        two computed steps (at the default 4 steps: step 3). With ``compile`` the blocks' forward
        is compiled and the cache decides around it.
    ``cache_threshold`` [float > 0]: First Block Cache threshold; higher is faster and worse.
    ``vae_tiling`` [auto | on | off]: tiled VAE decode (less memory, seams possible). ``auto``:
        on only when the CUDA device has little free memory after the load.
    ``vae_dtype`` [auto | float32 | bfloat16 | float16]: VAE weights dtype. float32 is what
        diffusers recommends for the Wan VAE. float16 has the 10-bit mantissa of the TF32
        convolutions a float32 VAE runs on a GPU, at about bfloat16's speed; an encode or decode
        that overflows its range runs again in float32 and the VAE stays float32
        (:func:`inference.vae_speed.fall_back_to_float32_on_overflow`). bfloat16 (7-bit mantissa)
        is lossy. ``auto``: float16 on CUDA, float32 elsewhere.
    ``vae_decode`` [auto | fast | stock]: ``fast`` decodes with :mod:`inference.vae_speed`
        (channels-last convolutions, fewer memory passes; the same frames within float rounding),
        ``stock`` with diffusers' code as it is; ``auto``: fast on CUDA, stock on CPU.
    ``text_cache_size`` [int >= 0]: prompt embeddings kept per pipeline (LRU); 0 disables.
    ``fp8`` [off | storage | compute]: FP8 (e4m3) weights for the transformer. Lossy, so off by
        default. ``storage``: weights kept in FP8 and cast up layer by layer for the computation
        (diffusers layerwise casting: about half the transformer's memory in bf16, a little slower;
        runs on any device; norms and embeddings stay as they are; not compiled: ``compile`` auto
        is then off and ``on`` fails the load). ``compute``: the transformer
        blocks' linear layers run FP8 matmuls with per-row scaled FP8 activations (torchao
        ``Float8DynamicActivationFloat8WeightConfig``), for CUDA GPUs of compute capability 8.9+
        (Ada, Hopper) with torchao installed; elsewhere the load fails. Measured on an H200
        (torch 2.11, torchao 0.18): slower than bf16 uncompiled (unfused activation quantisation),
        and its compiled warm-up ran past 3 minutes; it saves ~6 GiB of peak memory.
    """

    attention_backend: str = "auto"
    compile: bool | None = None
    cache: str = "none"
    cache_threshold: float = 0.05
    vae_tiling: str = "auto"
    vae_dtype: str = "auto"
    vae_decode: str = "auto"
    text_cache_size: int = 32
    fp8: str = "off"

    def __post_init__(self) -> None:
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be None (auto), True or False, got {self.compile!r}")
        _check_choice("cache", self.cache, CACHE_KINDS)
        if isinstance(self.cache_threshold, bool) or not isinstance(self.cache_threshold, (int, float)) \
                or not self.cache_threshold > 0:
            raise ValueError(f"cache_threshold must be a number > 0, got {self.cache_threshold!r}")
        _check_choice("vae_tiling", self.vae_tiling, VAE_TILING_MODES)
        _check_choice("vae_dtype", self.vae_dtype, VAE_DTYPES)
        _check_choice("vae_decode", self.vae_decode, VAE_DECODE_MODES)
        if isinstance(self.text_cache_size, bool) or not isinstance(self.text_cache_size, int) \
                or self.text_cache_size < 0:
            raise ValueError(f"text_cache_size must be an integer >= 0, got {self.text_cache_size!r}")
        _check_choice("fp8", self.fp8, FP8_MODES)

    @classmethod
    def from_strings(cls, values: Mapping[str, str]) -> InferenceOptions:
        """Build options from ``{field name: string}``, e.g. values read from the environment.

        Missing keys and empty strings keep the default. Values are trimmed and matched
        case-insensitively. Unknown keys or unparsable values raise ``ValueError`` naming the
        field and the accepted values.
        """
        known = set(OPTION_NAMES)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown inference option(s) {unknown}; known: {sorted(known)}")
        parsed: dict[str, object] = {}
        for name, raw in values.items():
            if not isinstance(raw, str):
                raise ValueError(f"inference option {name} must be given as a string, got {type(raw).__name__}")
            text = raw.strip()
            if text:
                parsed[name] = _PARSERS.get(name, _parse_lower)(name, text)
        return cls(**parsed)

    def as_strings(self) -> dict[str, str]:
        """The inverse of :meth:`from_strings`: every field as the string that parses back to it."""
        strings = {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}
        strings["compile"] = {None: "auto", True: "on", False: "off"}[self.compile]
        return strings


# Field names in declaration order, e.g. for reading one environment variable per option.
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(InferenceOptions))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _parse_lower(name: str, text: str) -> str:
    return text.lower()


def _parse_compile(name: str, text: str) -> bool | None:
    word = text.lower()
    if word == "auto":
        return None
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be auto, on or off (or 1/0, true/false, yes/no); got {text!r}")


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


_PARSERS = {
    "compile": _parse_compile,
    "cache_threshold": _parse_float,
    "text_cache_size": _parse_int,
}
