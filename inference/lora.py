"""LoRA adapters per request on a cached Wan pipeline, base weights never touched.

A LoRA is a ``<name>.safetensors`` file directly inside a LoRA directory, in any key format
diffusers' ``WanLoraLoaderMixin`` reads (PEFT ``transformer.blocks.0.attn1.to_q.lora_A.weight``,
original Wan ``diffusion_model.…lora_down``, musubi ``lora_unet_…``). Its *name* is the file
stem (``anime`` for ``anime.safetensors``); :func:`list_loras` lists them.

Adapters are loaded through PEFT (``pipe.load_lora_weights``) and stay loaded, at most
:data:`MAX_LOADED_LORAS` per pipeline (least recently used dropped first), so a request that
uses the LoRA of the one before switches with ``set_adapters`` instead of reading the file
again. Nothing is ever fused: PEFT adds ``B @ A * strength`` beside the untouched base layer,
and a disabled adapter runs the base layer alone, so "no LoRA" gives exactly the frames of a
pipeline that never saw one. Works on T2V and I2V pipelines alike (diffusers pads a T2V LoRA
with zeros for the I2V image projections). Only the transformer is adapted, so cached prompt
embeddings stay valid.

Importing this module is cheap (no torch); torch, diffusers and peft load on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pathlib
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
MAX_LORA_STRENGTH = 2.0
# Loaded adapters kept per pipeline; a 14B Wan LoRA of rank 64 is ~0.3 GB of device memory.
MAX_LOADED_LORAS = 4
# A name is a plain file stem: no separators, no leading dot (hidden files, "..").
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoraError(ValueError):
    """A LoRA name is malformed, names no file inside the LoRA directory, or failed to load."""


def check_lora_name(name: str) -> None:
    """Raise :class:`LoraError` unless ``name`` is a well-formed LoRA name (syntax only).

    Well-formed: 1–128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a
    letter or digit. So no path separators, no ``..`` component, no hidden files.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise LoraError(f"invalid LoRA name {name!r}: use letters, digits, '.', '_' and '-' only")


def list_loras(lora_dir: str | os.PathLike) -> list[str]:
    """Names (file stems, sorted) of the LoRA files directly inside ``lora_dir``.

    Listed are regular ``*.safetensors`` files with a well-formed name whose resolved path
    (symlinks followed) is still inside ``lora_dir``; every listed name is accepted by
    :func:`resolve_lora_file`. A missing directory has no LoRAs (``[]``).
    """
    root = pathlib.Path(lora_dir).expanduser().resolve()
    if not root.is_dir():
        return []
    names = []
    for entry in root.iterdir():
        if entry.suffix != LORA_SUFFIX:
            continue
        with contextlib.suppress(LoraError):
            resolve_lora_file(root, entry.stem)
            names.append(entry.stem)
    return sorted(names)


def resolve_lora_file(lora_dir: str | os.PathLike, name: str) -> pathlib.Path:
    """The resolved path of LoRA ``name`` in ``lora_dir``; :class:`LoraError` if there is none.

    Refused: malformed names (see :func:`check_lora_name`), missing files, anything that is not
    a regular file, and symlinks that resolve outside ``lora_dir``.
    """
    check_lora_name(name)
    root = pathlib.Path(lora_dir).expanduser().resolve()
    try:
        path = (root / f"{name}{LORA_SUFFIX}").resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise LoraError(f"no LoRA named {name!r}") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise LoraError(f"no LoRA named {name!r}")
    return path


def check_lora_strength(strength: float) -> None:
    """Raise :class:`LoraError` unless ``strength`` is a finite number in [0, 2]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0.0 <= strength <= MAX_LORA_STRENGTH:
        raise LoraError(f"LoRA strength must be a number from 0 to {MAX_LORA_STRENGTH:g}, got {strength!r}")


@dataclass
class _LoraSlots:
    """What one pipeline holds: loaded adapters by file identity (LRU order) and counters."""

    adapters: OrderedDict[tuple[str, int, int], str] = field(default_factory=OrderedDict)
    names: dict[str, str] = field(default_factory=dict)  # adapter -> LoRA name, for reporting
    active: tuple[str, float] | None = None  # (LoRA name, strength) now applied
    loads: int = 0
    next_id: int = 0


_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_slots_guard = threading.Lock()


def _slots_for(pipe) -> _LoraSlots:
    with _slots_guard:
        slots = _slots.get(pipe)
        if slots is None:
            slots = _slots[pipe] = _LoraSlots()
        return slots


def lora_load_count(pipe) -> int:
    """How many times a LoRA file was read into ``pipe`` (switching to a loaded one is free)."""
    return _slots_for(pipe).loads


def loaded_loras(pipe) -> list[str]:
    """Names of the LoRAs now loaded into ``pipe``, least recently used first."""
    slots = _slots_for(pipe)
    return [slots.names[adapter] for adapter in slots.adapters.values()]


def active_lora(pipe) -> tuple[str, float] | None:
    """``(name, strength)`` of the LoRA applied to ``pipe`` now, or None."""
    return _slots_for(pipe).active


def apply_lora(
    pipe,
    lora_dir: str | os.PathLike | None,
    name: str | None,
    strength: float = 1.0,
    *,
    max_loaded: int = MAX_LOADED_LORAS,
) -> None:
    """Make LoRA ``name`` at ``strength`` the only adapter active on ``pipe`` (None: no LoRA).

    ``strength`` 0 is the same as no LoRA (nothing is loaded, no extra compute). A LoRA already
    loaded (same resolved file, same mtime and size) is reused; a changed file is loaded
    afresh. Beyond ``max_loaded`` adapters the least recently used is deleted. Raises
    :class:`LoraError` for a bad strength, name or ``lora_dir`` (None while ``name`` is set),
    or a file that does not load; after a bad name or file no LoRA is active.
    """
    from .pipelines import pipe_lock

    check_lora_strength(strength)
    with pipe_lock(pipe):
        slots = _slots_for(pipe)
        if name is None or strength == 0:
            _deactivate(pipe, slots)
            return
        try:
            if lora_dir is None:
                raise LoraError(f"LoRA {name!r} requested but no LoRA directory is configured")
            path = resolve_lora_file(lora_dir, name)
            adapter = _loaded_adapter(pipe, slots, path, name, max_loaded)
        except LoraError:
            _deactivate(pipe, slots)
            raise
        pipe.enable_lora()
        pipe.set_adapters([adapter], [float(strength)])
        slots.active = (name, float(strength))


@contextlib.contextmanager
def lora_applied(
    pipe, lora_dir: str | os.PathLike | None, name: str | None, strength: float = 1.0
) -> Iterator[None]:
    """Hold ``pipe``'s lock with :func:`apply_lora` in force; disable the adapter on exit.

    So outside a run no adapter is active, whoever calls ``pipe`` next. A run with an adapter
    active runs compiled blocks eagerly: their graphs are specialised on the adapters PEFT holds,
    so each new adapter would recompile (tens of seconds on a GPU) and the ninth would fail the
    run (dynamo's recompile limit is a hard error under ``fullgraph``).
    """
    import torch

    from .fastpath import plain_run_stance
    from .pipelines import pipe_lock

    with pipe_lock(pipe):
        apply_lora(pipe, lora_dir, name, strength)
        adapted = _slots_for(pipe).active is not None
        try:
            with torch.compiler.set_stance("force_eager" if adapted else plain_run_stance()):
                yield
        finally:
            _deactivate(pipe, _slots_for(pipe))


def unload_loras(pipe) -> None:
    """Delete every adapter and put the original layers back (state_dict keys as loaded)."""
    from .pipelines import pipe_lock

    with pipe_lock(pipe):
        slots = _slots_for(pipe)
        if slots.adapters:
            pipe.unload_lora_weights()
        slots.adapters.clear()
        slots.names.clear()
        slots.active = None


def base_weights_checksum(module) -> str:
    """SHA-256 of ``module``'s weights minus any LoRA adapter, under the original names.

    PEFT renames a wrapped layer's weight to ``….base_layer.weight``; this maps it back and
    skips ``lora_*`` tensors, so the value is equal before, during and after LoRA use exactly
    when the base weights are. Reads every tensor (about a second per GB).
    """
    import torch

    digest = hashlib.sha256()
    entries = {}
    for key, tensor in module.state_dict().items():
        if ".lora_" in key:
            continue
        entries[key.replace(".base_layer.", ".")] = tensor
    for key in sorted(entries):
        tensor = entries[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _deactivate(pipe, slots: _LoraSlots) -> None:
    if slots.adapters:  # pipelines that never had a LoRA are left as loaded
        pipe.disable_lora()
    slots.active = None


def _file_identity(path: pathlib.Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


def _loaded_adapter(pipe, slots: _LoraSlots, path: pathlib.Path, name: str, max_loaded: int) -> str:
    """The adapter holding ``path``'s current contents, loading it (and evicting) if needed."""
    identity = _file_identity(path)
    adapter = slots.adapters.get(identity)
    if adapter is not None:
        slots.adapters.move_to_end(identity)
        return adapter
    stale = [key for key in slots.adapters if key[0] == identity[0]]  # same file, since rewritten
    while slots.adapters and (stale or len(slots.adapters) >= max(1, max_loaded)):
        key = stale.pop() if stale else next(iter(slots.adapters))
        _delete_adapter(pipe, slots, key)

    from .fastpath import match_lora_dtype

    adapter = f"adapter{slots.next_id}"  # PEFT module keys: no dots; never "lora_…" (PEFT's prefix)
    slots.next_id += 1
    try:
        with warnings.catch_warnings():
            # PEFT warns on every adapter after the first; several loaded adapters are the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        match_lora_dtype(pipe.transformer)  # FP8-stored base weights (fp8="storage")
    except Exception as exc:
        _discard_partial_adapter(pipe, adapter)
        raise LoraError(f"LoRA {name!r} could not be loaded: {exc}") from exc
    slots.adapters[identity] = adapter
    slots.names[adapter] = name
    slots.loads += 1
    logger.info("loaded LoRA %s from %s as %s into %s", name, path, adapter, type(pipe).__name__)
    return adapter


def _delete_adapter(pipe, slots: _LoraSlots, key: tuple[str, int, int]) -> None:
    adapter = slots.adapters.pop(key)
    name = slots.names.pop(adapter, "?")
    pipe.delete_adapters([adapter])
    logger.info("dropped LoRA %s (%s) from %s", name, adapter, type(pipe).__name__)


def _discard_partial_adapter(pipe, adapter: str) -> None:
    """Remove whatever a failed load of ``adapter`` left injected."""
    with contextlib.suppress(Exception):
        if adapter in getattr(pipe.transformer, "peft_config", {}):
            pipe.delete_adapters([adapter])
