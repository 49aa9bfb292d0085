"""Reuse text-encoder output for repeated prompts: an LRU of prompt embeddings per pipeline.

The UMT5-XXL encoder costs a few hundred milliseconds per prompt on a GPU (more on CPU), and
services see the same prompt and negative prompt again and again (retries, long videos made
of fragments, the default negative prompt). Embeddings depend only on the text, the encoder,
its device and dtype, and the sequence length, so a cached copy is bit-identical to a fresh one.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from .options import InferenceOptions

# WanPipeline.__call__'s default; the embeddings' shape (and the model's output) depends on it.
MAX_SEQUENCE_LENGTH = 512


class PromptKey(NamedTuple):
    """What determines one cached pair of embeddings (the encoder is implied by the cache's pipe)."""

    prompt: str
    negative_prompt: str | None  # None when guidance is off: the negative branch never runs
    guidance: bool
    device: str
    dtype: str
    max_sequence_length: int


class PromptEmbeds(NamedTuple):
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None


class PromptEmbeddingCache:
    """A thread-safe LRU of :class:`PromptEmbeds` holding at most ``max_entries`` (0: none).

    Cached tensors are shared between callers and must not be modified in place (the Wan
    pipelines only read them).
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PromptKey, PromptEmbeds] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: PromptKey) -> PromptEmbeds | None:
        """The entry for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: PromptKey, entry: PromptEmbeds) -> None:
        """Store ``entry``, evicting the least recently used beyond ``max_entries``."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry (call after changing the text encoder's weights)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# Keyed weakly so a pipeline dropped from every cache takes its embeddings with it.
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def attach_prompt_cache(pipe, max_entries: int) -> PromptEmbeddingCache:
    """Give ``pipe`` a fresh cache of ``max_entries`` (replacing any it had) and return it."""
    cache = PromptEmbeddingCache(max_entries)
    with _caches_lock:
        _caches[pipe] = cache
    return cache


def prompt_cache_for(pipe) -> PromptEmbeddingCache:
    """``pipe``'s cache; pipelines not built by ``load_pipeline`` get one of the default size."""
    with _caches_lock:
        cache = _caches.get(pipe)
        if cache is None:
            cache = _caches[pipe] = PromptEmbeddingCache(InferenceOptions().text_cache_size)
        return cache


def encode_prompt_cached(
    pipe,
    *,
    prompt: str,
    negative_prompt: str | None,
    guidance: bool,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> PromptEmbeds:
    """Embeddings of ``prompt`` (and of ``negative_prompt`` when ``guidance``) for ``pipe``.

    Equal to what ``pipe(prompt=..., negative_prompt=..., max_sequence_length=...)`` computes
    internally, bit for bit; served from ``pipe``'s cache when the same key was encoded
    before. ``negative_prompt_embeds`` is None when ``guidance`` is false.
    """
    device = pipe._execution_device
    key = PromptKey(
        prompt=prompt,
        negative_prompt=(negative_prompt or "") if guidance else None,
        guidance=guidance,
        device=str(device),
        dtype=str(pipe.text_encoder.dtype),
        max_sequence_length=max_sequence_length,
    )
    cache = prompt_cache_for(pipe)
    cached = cache.get(key)
    if cached is not None:
        return cached
    # The pipeline's __call__ runs under no_grad; encode_prompt alone does not, and a
    # cached tensor with an autograd graph would pin the encoder's activations.
    with torch.no_grad():
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=key.negative_prompt,
            do_classifier_free_guidance=guidance,
            num_videos_per_prompt=1,
            max_sequence_length=max_sequence_length,
            device=device,
        )
    entry = PromptEmbeds(prompt_embeds, negative_prompt_embeds)
    cache.put(key, entry)
    return entry
