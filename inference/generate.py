"""Run one generation request through a loaded Wan pipeline and return uint8 frames."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
import traceback
from collections.abc import Callable

import numpy as np
from PIL import Image

from .images import check_resize_mode, fit_size, prepare_image
from .lora import check_lora_name, check_lora_strength
from .options import CACHE_KINDS
from .sampling import check_sampling

logger = logging.getLogger(__name__)

FPS = 16
# The Wan VAE compresses time 4x, keeping the first frame: valid frame counts are 4k + 1.
TEMPORAL_STRIDE = 4
# Height and width must be multiples of VAE stride (8) x transformer patch (2).
SPATIAL_MULTIPLE = 16


def frames_for_duration(seconds: int, fps: int = FPS) -> int:
    """Frame count for a clip of ``seconds`` at ``fps``: ``fps * seconds + 1`` (81 for 5 s at 16)."""
    return fps * seconds + 1


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines one generated clip.

    ``image`` set means image-to-video (the image becomes the first frame), else text-to-video.
    Construction validates what the pipeline would otherwise silently round or reject:
    ``num_frames`` must be 4k + 1, ``height``/``width`` positive multiples of 16,
    ``infer_steps`` >= 1, and the optional fields below (``ValueError`` otherwise).

    Optional per-request choices (the defaults give exactly the frames of a plain run):

    ``sample_shift``: flow shift (> 0); None keeps the shift the pipeline's scheduler is
        configured with (3.0 in the tiny model and the Wan2.1 checkpoints). A server that
        wants a size-dependent default passes :func:`inference.sampling.default_shift`.
    ``scheduler``: one of :data:`inference.sampling.SCHEDULERS` (``unipc``, ``euler``); None
        keeps the pipeline's own scheduler kind.
    ``resize_mode``: how an I2V image is fitted, one of :data:`inference.images.RESIZE_MODES`
        (``stretch`` default, ``adaptive``, ``fixed_shape``). ``adaptive`` changes the video
        size: :meth:`output_size` tells the size the frames will have.
    ``lora_name``/``lora_strength``: a LoRA of the ``lora_dir`` given to
        :func:`generate_frames` (a file stem, see :func:`inference.lora.list_loras`) and its
        strength in [0, 2]; None or strength 0: no LoRA.
    ``step_cache``: one of :data:`inference.options.CACHE_KINDS` for this run (lossy speed-up,
        see :class:`inference.options.InferenceOptions` ``cache``); None runs with the cache
        the pipeline was loaded with (none unless its options named one).
    """

    prompt: str
    negative_prompt: str = ""
    image: Image.Image | None = None
    infer_steps: int = 4
    num_frames: int = 81
    height: int = 480
    width: int = 832
    seed: int = 0
    guidance_scale: float = 1.0
    sample_shift: float | None = None
    scheduler: str | None = None
    resize_mode: str = "stretch"
    lora_name: str | None = None
    lora_strength: float = 1.0
    step_cache: str | None = None

    def __post_init__(self) -> None:
        if self.infer_steps < 1:
            raise ValueError(f"infer_steps must be >= 1, got {self.infer_steps}")
        if self.num_frames < 1 or (self.num_frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"num_frames must be 4k + 1 (e.g. 17, 81), got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % SPATIAL_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SPATIAL_MULTIPLE}, got {value}")
        check_sampling(self.scheduler, self.sample_shift)
        check_resize_mode(self.resize_mode)
        if self.lora_name is not None:
            check_lora_name(self.lora_name)  # LoraError is a ValueError
        check_lora_strength(self.lora_strength)
        if self.step_cache is not None and self.step_cache not in CACHE_KINDS:
            raise ValueError(f"step_cache must be one of {', '.join(CACHE_KINDS)}; got {self.step_cache!r}")

    @property
    def kind(self) -> str:
        """``"i2v"`` when an image is given, else ``"t2v"``."""
        return "t2v" if self.image is None else "i2v"

    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames :func:`generate_frames` returns for this request: the
        requested size, except for I2V with ``resize_mode="adaptive"`` (:func:`inference.images.fit_size`)."""
        if self.image is None:
            return self.height, self.width
        return fit_size(*self.image.size, height=self.height, width=self.width, resize_mode=self.resize_mode)


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline frames (floats in [0, 1]) -> uint8, rounded to nearest and clipped."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def video_to_uint8(video):
    """A pipeline's ``output_type="pt"`` video ``(frames, 3, h, w)``, floats in [0, 1] on any device
    -> uint8 ``(frames, h, w, 3)`` on that device. The same numbers :func:`frames_to_uint8` gives
    for the ``"np"`` output (float32 multiply, round half to even, clip), without copying floats
    to the host first."""
    import torch

    return (video.float() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def generate_frames(
    pipe,
    request: GenerationRequest,
    on_step: Callable[[int, int], None] | None = None,
    *,
    lora_dir: str | os.PathLike | None = None,
    on_frames: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Generate ``request`` with ``pipe``; return frames as uint8 ``(num_frames, h, w, 3)``.

    ``(h, w)`` is ``request.output_size()``: the requested size except for adaptive I2V.
    T2V needs a ``WanPipeline``-like pipe and ``request.image is None``; I2V needs a
    ``WanImageToVideoPipeline`` and an image (mismatch: ``ValueError``). Noise comes from a
    CPU generator seeded with ``request.seed``, so a request is reproducible across devices
    and byte-identical on CPU. Prompt embeddings come from ``pipe``'s prompt cache (identical
    to encoding afresh). ``guidance_scale <= 1`` runs one transformer pass per step (no
    unconditional branch), above 1 two. ``on_step(step, total)`` runs after each denoising
    step with step = 1..total. Any exception it raises stops generation at once (no VAE
    decode) and propagates unchanged; model hooks are freed however the call ends, and after
    a failure the run's tensors are released (and the CUDA cache emptied) before it propagates.

    The run holds ``pipe``'s lock (:func:`inference.pipelines.pipe_lock`) and applies the
    request's LoRA (read from ``lora_dir``; :class:`inference.lora.LoraError` when it is
    missing or bad) and scheduler/shift for its duration only: afterwards ``pipe`` has its
    own scheduler back and no adapter active, whatever the request chose. Compiled blocks that hit
    dynamo's recompile limit run eagerly where they need a new graph, from then on in this process.

    ``on_frames(chunk)`` receives, in order and in one or more uint8 chunks, exactly the frames
    returned: each chunk as the VAE decodes it (one latent frame: 1 frame, then 4), so that
    encoding can overlap decoding; with tiled decoding, all of them after the decode. On CUDA a
    chunk is handed on when the next one has been queued (its host copy runs meanwhile), so the
    GPU never waits for the host. What it raises stops the run like ``on_step``.
    """
    from diffusers import WanImageToVideoPipeline

    from .fastpath import past_the_recompile_limit

    pipe_is_i2v = isinstance(pipe, WanImageToVideoPipeline)
    if pipe_is_i2v != (request.kind == "i2v"):
        raise ValueError(
            f"{request.kind} request needs a {'WanImageToVideoPipeline' if request.kind == 'i2v' else 'WanPipeline'},"
            f" got {type(pipe).__name__}"
        )
    if pipe_is_i2v:
        from .pipelines import patch_wan_i2v_without_ftfy

        patch_wan_i2v_without_ftfy()  # for pipes not built by load_pipeline

    return past_the_recompile_limit(lambda: _generate_once(pipe, request, on_step, lora_dir, on_frames))


def _generate_once(pipe, request: GenerationRequest, on_step, lora_dir, on_frames) -> np.ndarray:
    """:func:`generate_frames` after its checks."""
    from .fastpath import step_cache_applied
    from .lora import lora_applied
    from .pipelines import pipe_lock
    from .sampling import scheduler_applied

    with pipe_lock(pipe), lora_applied(pipe, lora_dir, request.lora_name, request.lora_strength), \
            scheduler_applied(pipe, request.scheduler, request.sample_shift), \
            step_cache_applied(pipe.transformer, request.step_cache):
        kwargs = _pipeline_kwargs(pipe, request, on_step)
        streamed: list[tuple[np.ndarray, object]] = []  # (host chunk, the same chunk on the device)
        try:
            with _decoded_chunks(pipe, (kwargs["height"], kwargs["width"]), on_frames, streamed):
                output = pipe(**kwargs)
        except BaseException as exc:
            try:
                # The pipeline frees hooks (and resets cache state) itself on success only; the VAE
                # clears its causal feature caches at the start and end of a decode, not on a failure.
                pipe.maybe_free_model_hooks()
                if hasattr(pipe.vae, "clear_cache"):
                    pipe.vae.clear_cache()
            finally:
                _release_failed_run(exc)
            raise

    video = video_to_uint8(output.frames[0])
    expected = (request.num_frames, kwargs["height"], kwargs["width"], 3)
    if tuple(video.shape) != expected:
        raise RuntimeError(f"pipeline returned frames of shape {tuple(video.shape)}, expected {expected}")
    if streamed:
        _check_streamed(streamed, video)
        return np.concatenate([host_chunk for host_chunk, _ in streamed])  # already on the host
    frames = video.cpu().numpy()
    if on_frames is not None:
        on_frames(frames)  # a tiled decode: every frame at once
    return frames


@contextlib.contextmanager
def _decoded_chunks(pipe, size: tuple[int, int], on_frames, streamed: list[np.ndarray]):
    """While active, each chunk ``pipe.vae.decoder`` returns goes through the pipeline's own
    post-processing (the VAE's clamp, ``postprocess_video``) and :func:`video_to_uint8` on its
    device, then to ``on_frames`` as a numpy array and onto ``streamed`` as (that array, the
    uint8 chunk on the device). Tiles of a tiled decode
    (smaller than ``size``) and patchified outputs are not whole frames and are left alone.
    CUDA chunks travel to pinned host memory asynchronously and are handed on one chunk late
    (the last one when the block ends without an error). A decode that starts again (a float16
    VAE's float32 rerun, :func:`inference.vae_speed.fall_back_to_float32_on_overflow`) drops
    the chunk not yet handed on and hands on only the frames after those already handed on;
    those stay in ``streamed`` with no device chunk (they are float16's, the video float32's)."""
    import torch

    vae = pipe.vae
    if on_frames is None or getattr(vae.config, "patch_size", None) is not None:
        yield
        return
    copying: list[tuple[torch.Tensor, torch.cuda.Event, torch.Tensor]] = []  # at most one: (host, copied, chunk)
    skipping = [0]  # frames a rerun decodes again that were handed on before it

    def hand_on(host_chunk: np.ndarray, chunk: torch.Tensor) -> None:
        streamed.append((host_chunk, chunk))
        on_frames(host_chunk)

    def hand_on_copied() -> None:
        if copying:
            host, copied, chunk = copying.pop()
            copied.synchronize()
            hand_on(host.numpy(), chunk)

    def start_again() -> None:
        copying.clear()
        skipping[0] = sum(len(host_chunk) for host_chunk, _ in streamed)
        streamed[:] = [(host_chunk, None) for host_chunk, _ in streamed]

    def on_decoded(module, args, kwargs, output) -> None:
        if tuple(output.shape[-2:]) != size:
            return
        if kwargs.get("first_chunk") and (streamed or copying):
            start_again()
        with torch.no_grad():
            pixels = pipe.video_processor.postprocess_video(torch.clamp(output, min=-1.0, max=1.0), output_type="pt")
            chunk = video_to_uint8(pixels[0])
        if skipping[0]:
            handed_on = min(skipping[0], len(chunk))
            skipping[0] -= handed_on
            chunk = chunk[handed_on:]
            if not len(chunk):
                return
        if chunk.device.type != "cuda":
            hand_on(chunk.numpy(), chunk)
            return
        host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
        host.copy_(chunk, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(chunk.device))  # the copy's stream, whichever device is current
        hand_on_copied()  # the previous chunk: its copy ran while this one was decoded
        copying.append((host, copied, chunk))

    handle = vae.decoder.register_forward_hook(on_decoded, with_kwargs=True)
    try:
        yield
        hand_on_copied()
    finally:
        handle.remove()


def _check_streamed(streamed: list, video) -> None:
    """Fail loudly unless the chunks handed on, joined, are exactly ``video``. ``streamed`` holds
    (host chunk, the same uint8 chunk on ``video``'s device, compared there so that the frames
    cross to the host once); a chunk handed on before the decode started again has no device
    chunk and is not compared."""
    import torch

    start = 0
    for host_chunk, chunk in streamed:
        if chunk is not None and not torch.equal(chunk, video[start : start + len(chunk)]):
            raise RuntimeError(f"streamed frames {start}..{start + len(chunk) - 1} differ from the decoded video")
        start += len(host_chunk)
    if start != len(video):
        raise RuntimeError(f"{start} frames streamed, the decoded video has {len(video)}")


def _pipeline_kwargs(pipe, request: GenerationRequest, on_step: Callable[[int, int], None] | None) -> dict:
    """Keyword arguments for one ``pipe(...)`` call; encodes the prompt (through the cache)."""
    import torch

    from .prompt_cache import MAX_SEQUENCE_LENGTH, encode_prompt_cached

    def step_callback(pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        total = pipeline.num_timesteps or request.infer_steps
        on_step(step_index + 1, total)
        return callback_kwargs  # the pipeline pops tensors from what we return

    # The same rule the pipelines use (do_classifier_free_guidance): no CFG at <= 1.
    guidance = request.guidance_scale > 1.0
    embeds = encode_prompt_cached(
        pipe,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance=guidance,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    height, width = request.height, request.width
    kwargs = dict(
        prompt_embeds=embeds.prompt_embeds,
        negative_prompt_embeds=embeds.negative_prompt_embeds,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        num_frames=request.num_frames,
        num_inference_steps=request.infer_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="pt",  # stays on the device: video_to_uint8 there, one uint8 copy to the host
        callback_on_step_end=step_callback if on_step is not None else None,
    )
    if request.image is not None:
        kwargs["image"], height, width = prepare_image(
            request.image, height=height, width=width, resize_mode=request.resize_mode
        )
    kwargs.update(height=height, width=width)
    return kwargs


def _release_failed_run(exc: BaseException) -> None:
    """Free what an aborted run still holds on the device before ``exc`` travels on.

    The traceback keeps the pipeline's frames, and with them the latents and activations,
    alive until the caller's ``except`` block ends; clearing those frames' locals (the
    traceback text stays intact) lets ``empty_cache`` hand the memory back to the device.
    """
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:  # what it was raised from or during holds frames too
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def warm_up(pipe, *, height: int, width: int, num_frames: int, steps: int = 1) -> float:
    """Run one throw-away generation of this size so compiled code and kernels are ready.

    Use the size the service will mostly see: with ``compile`` on, each new shape compiles
    once (tens of seconds). I2V pipes get a plain grey image. Returns the seconds it took.
    Raises what :func:`generate_frames` raises (``ValueError`` for an invalid size).
    """
    from diffusers import WanImageToVideoPipeline

    image = None
    if isinstance(pipe, WanImageToVideoPipeline):
        image = Image.new("RGB", (width, height), (128, 128, 128))
    request = GenerationRequest(
        prompt="warm-up", image=image, infer_steps=steps, num_frames=num_frames, height=height, width=width
    )
    started = time.perf_counter()
    generate_frames(pipe, request)
    elapsed = time.perf_counter() - started
    logger.info("warmed up %s at %dx%dx%d, %d step(s), in %.1f s",
                type(pipe).__name__, width, height, num_frames, steps, elapsed)
    return elapsed


def continuation_request(previous: GenerationRequest, frames: np.ndarray) -> GenerationRequest:
    """The request for the fragment after ``previous``, whose output was ``frames``.

    An I2V request conditioned on exactly the last frame, with ``seed + 1`` and the size the
    frames actually have (an adaptive first fragment may differ from the size asked for);
    every other field is kept. The image already has the target size, so every resize mode
    hands it to the pipeline pixel for pixel.
    """
    _, height, width, _ = frames.shape
    return dataclasses.replace(
        previous, image=last_frame_image(frames), height=height, width=width, seed=previous.seed + 1
    )


def last_frame_image(frames: np.ndarray) -> Image.Image:
    """The last frame of uint8 ``(n, h, w, 3)`` frames as an RGB image (seed for the next fragment)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected frames of shape (n, h, w, 3) with n >= 1, got {frames.shape}")
    return Image.fromarray(np.ascontiguousarray(frames[-1], dtype=np.uint8)).convert("RGB")
