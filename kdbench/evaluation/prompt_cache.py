"""The teacher's prompt prefill on disk: the evaluation prompts run through the teacher once.

Every run of a suite is evaluated on the same prompts, and the teacher scores each run's
samples through its cache of those prompts (kdbench/evaluation/decoder.py ``Decoder``): the same prefill
in every run — ~16–20 s of a float32 run's 166–226 s evaluation on 2 cores
(docs/performance.md). The first evaluation that needs it builds it and publishes it here;
later ones load it. The stored tensors are the computed ones, so a loaded prefix is bit for bit
the prefill's (tests/test_prompt_cache.py decodes and scores from both): the key holds
everything that result depends on — the teacher's content, the prompt ids, how they are
batched, the device, the dtype, the thread count and the torch / transformers versions.

An entry is read one batch of prompts (a chunk of the :class:`~kdbench.evaluation.decoder.Decoder`)
at a time, and built so too: each chunk is prefilled, written and released before the next,
so neither building nor reading ever holds more than one chunk's prefix (a whole task's would
not fit a GPU at GPT-2 XL scale: ~130 GB on S-NI). The first request of an entry that is not
published builds all of its chunks, then reads the one asked for from disk like every later
request.

Layout of an entry ``$KDBENCH_CACHE/teacher-prompts/<key>/`` (format 2)::

    batch-<i>.pt  batch ``i`` of prompts (5 digits): ``k.<layer>``, ``v.<layer>`` (keys and values,
                  ``[n, kv_heads, width, head_dim]``), ``last_hidden`` ``[n, d]``, ``mask``
                  ``[n, width]``, ``next_pos`` ``[n]`` (``torch.save``; loaded memory-mapped, so the
                  loaded cache costs the memory a computed one does, not twice that)
    meta.json     key, format, its inputs, number of batches and layers (written last)

Format 1 kept a task's batches in one ``prefix.pt``, which had to be loaded whole; its entries
are listed by ``kdbench cache list`` (their keys differ) but never read.

Published like every cache (kdbench/diskcache.py): built under an exclusive lock in a
temporary folder that is renamed into place, so no reader sees half an entry.
A cache whose layers are not plain ``DynamicLayer``s (sliding windows, quantised caches) is
used live and never stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from kdbench import diskcache
from kdbench.device import cache_device
from kdbench.diskcache import Published, cache_home, digest, lock, mark_used, publishing_dir
from kdbench.evaluation.sampling import Prefix

FORMAT = 2  # 2: one file per batch of prompts (format 1 entries are listed, not read); bump when
#              kdbench.evaluation.sampling.prefill computes something else


def cache_root() -> Path:
    """``$KDBENCH_CACHE/teacher-prompts``, not created here (a builder's lock creates it)."""
    return cache_home() / "teacher-prompts"


def prompts_digest(prompt_ids: Sequence[Sequence[int]]) -> str:
    return digest([list(p) for p in prompt_ids], 64)


def key_inputs(teacher_identity: dict, prompt_ids, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """What a teacher's prefill of these prompts depends on (the key is their digest); the device
    as :func:`kdbench.device.cache_device` says it (its kind on a GPU)."""
    import transformers

    inputs = {"teacher": teacher_identity, "prompts": prompts_digest(prompt_ids), "batch_size": batch_size,
              "device": cache_device(device), "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cpu":  # the CPU's reductions split by thread count; a GPU's do not (torchrun's OMP=1 too)
        inputs["threads"] = torch.get_num_threads()
    return inputs


def entry_key(inputs: dict) -> str:
    """The key of ``inputs`` and this cache's format (not the teacher cache's: a change there
    must not orphan these entries)."""
    return digest({"prompt_cache_format": FORMAT, **inputs})


@dataclass
class PromptCache:
    """The entry of one teacher on one task's prompts: :meth:`prefix` reads it one batch of
    prompts at a time, building and publishing it first where it is missing."""

    key: str
    inputs: dict
    _live: bool = field(default=False, init=False, repr=False, compare=False)     # not storable: computed live
    _stamped: bool = field(default=False, init=False, repr=False, compare=False)  # last-used stamp written

    @property
    def path(self) -> Path:
        return cache_root() / self.key

    def prefix(self, i: int, compute: Callable[[int], Prefix], device: torch.device, config=None, *,
               batches: int) -> Prefix:
        """Batch ``i``'s :class:`~kdbench.evaluation.sampling.Prefix` (of ``batches``): read from the
        published entry; when there is none, the entry is built first (``compute(j)``, the live
        prefill of batch ``j``, for every batch, one at a time) and published, then read like
        every later request. ``config``: the model's (its cache layers are made from it, as the
        model's own forward makes them). A cache that cannot be stored is computed live, here and
        for every later batch."""
        if self._live:
            return compute(i)
        loaded = self._read(i, device, config)
        if loaded is not None:
            return loaded
        with lock(cache_root(), self.key):
            loaded = self._read(i, device, config)  # another process published it while we waited
            if loaded is not None:
                return loaded
            if not _build(self.path, self.key, self.inputs, compute, batches):
                self._live = True
                return compute(i)
            self._stamped = True  # built here: reading it back is not a later run's use
        loaded = self._read(i, device, config)
        return loaded if loaded is not None else compute(i)  # cleared under our feet: live, the same tensors

    def _read(self, i: int, device: torch.device, config) -> Prefix | None:
        loaded = _load(self.path, i, device, config)
        if loaded is not None and not self._stamped:
            mark_used(self.path)
            self._stamped = True
        return loaded


class _Unstorable(Exception):
    """A batch's cache is not made of plain ``DynamicLayer``s: the entry is not published."""


def _storable(prefix: Prefix) -> bool:
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(prefix.cache, "layers", [None]))


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU as its own storage (``torch.save`` writes a view's whole storage)."""
    t = t.detach().cpu()
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _batch_file(i: int) -> str:
    return f"batch-{i:05d}.pt"


def _build(final: Path, key: str, inputs: dict, compute: Callable[[int], Prefix], batches: int) -> bool:
    """Compute, write and release each batch's prefix in turn, then publish the entry; False
    (nothing published) when a batch's cache cannot be stored."""
    layers = 0
    try:
        with publishing_dir(final) as folder:
            for i in range(batches):
                p = compute(i)
                if not _storable(p):
                    raise _Unstorable
                layers = len(p.cache.layers)
                tensors = {"last_hidden": _own(p.last_hidden), "mask": _own(p.mask), "next_pos": _own(p.next_pos)}
                for n, layer in enumerate(p.cache.layers):
                    tensors[f"k.{n}"], tensors[f"v.{n}"] = _own(layer.keys), _own(layer.values)
                torch.save(tensors, folder / _batch_file(i))
                del p, tensors  # released before the next batch is computed
            meta = {"key": key, "format": FORMAT, "inputs": inputs, "batches": batches, "layers": layers,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    except _Unstorable:
        return False
    return True


def _load(path: Path, i: int, device: torch.device, config=None) -> Prefix | None:
    """Batch ``i``'s prefix from the published entry at ``path``, or None when there is no
    complete entry of this format. The cache layers hold the stored tensors themselves (what
    ``DynamicLayer.update`` would hold after the prefill, without its copy)."""
    from transformers.cache_utils import DynamicCache

    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT or not 0 <= i < int(meta["batches"]):
            return None
        tensors = torch.load(path / _batch_file(i), mmap=True, weights_only=True, map_location=device)
        cache = DynamicCache(config=config)
        for n in range(int(meta["layers"])):
            k, v = tensors[f"k.{n}"], tensors[f"v.{n}"]
            cache.update(k[:, :, :0], v[:, :, :0], n)  # makes and initialises the layer (dtype, device)
            cache.layers[n].keys, cache.layers[n].values = k, v
        return Prefix(cache, tensors["last_hidden"], tensors["mask"], tensors["next_pos"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None


def list_entries() -> list[Published]:
    """The published entries, by key. Reads only: creates nothing, stamps nothing."""
    return diskcache.published(cache_root())


def clear(keys: Sequence[str] = (), *, everything: bool = False) -> list[tuple[str, int]]:
    """Remove the entries with these whole keys, or every entry; returns (key, bytes freed)."""
    return diskcache.clear(cache_root(), keys, everything=everything)
