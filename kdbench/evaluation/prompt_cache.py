"""The teacher's prompt prefill on disk: the evaluation prompts run through the teacher once.

Every run of a suite is evaluated on the same prompts, and the teacher scores each run's
samples through its cache of those prompts (kdbench/evaluation/decoder.py ``Decoder``): the same prefill
in every run — ~16–20 s of a float32 run's 166–226 s evaluation on 2 cores
(docs/performance.md). The first evaluation that needs it computes it as before and publishes
it here; later ones load it. The stored tensors are the computed ones, so a loaded prefix is
bit for bit the prefill's (tests/test_prompt_cache.py decodes and scores from both): the key
holds everything that result depends on — the teacher's content, the prompt ids, how they are
batched, the device, the dtype, the thread count and the torch / transformers versions.

Layout of an entry ``$KDBENCH_CACHE/teacher-prompts/<key>/``::

    prefix.pt   per batch ``i`` of prompts: ``i.k.<layer>``, ``i.v.<layer>`` (keys and values,
                ``[n, kv_heads, width, head_dim]``), ``i.last_hidden`` ``[n, d]``, ``i.mask``
                ``[n, width]``, ``i.next_pos`` ``[n]`` (``torch.save``; loaded memory-mapped, so
                the loaded cache costs the memory a computed one does, not twice that)
    meta.json   key, its inputs, number of batches and layers (written last)

Published like every cache (kdbench/diskcache.py): built under an exclusive lock in a
temporary folder that is renamed into place, so no reader sees half an entry.
A cache whose layers are not plain ``DynamicLayer``s (sliding windows, quantised caches) is
used live and never stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from kdbench import diskcache
from kdbench.diskcache import Published, cache_home, digest, lock, mark_used, publishing_dir
from kdbench.evaluation.sampling import Prefix

FORMAT = 1  # bump when kdbench.evaluation.sampling.prefill computes something else


def cache_root() -> Path:
    """``$KDBENCH_CACHE/teacher-prompts``, not created here (a builder's lock creates it)."""
    return cache_home() / "teacher-prompts"


def prompts_digest(prompt_ids: Sequence[Sequence[int]]) -> str:
    return digest([list(p) for p in prompt_ids], 64)


def key_inputs(teacher_identity: dict, prompt_ids, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """What a teacher's prefill of these prompts depends on (the key is their digest)."""
    import transformers

    return {"teacher": teacher_identity, "prompts": prompts_digest(prompt_ids), "batch_size": batch_size,
            "device": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def entry_key(inputs: dict) -> str:
    """The key of ``inputs`` and this cache's format (not the teacher cache's: a change there
    must not orphan these entries)."""
    return digest({"prompt_cache_format": FORMAT, **inputs})


@dataclass
class PromptCache:
    """The entry of one teacher on one task's prompts: :meth:`prefixes` loads it, or computes
    and publishes it."""

    key: str
    inputs: dict

    @property
    def path(self) -> Path:
        return cache_root() / self.key

    def prefixes(self, compute: Callable[[], list], device: torch.device, config=None) -> list:
        """The prompts' :class:`~kdbench.evaluation.sampling.Prefix` per batch: loaded when published, else
        ``compute()`` (the live prefill), published for the next run. ``config``: the model's
        (its cache layers are made from it, as the model's own forward makes them)."""
        loaded = _load(self.path, device, config)
        if loaded is not None:
            mark_used(self.path)
            return loaded
        with lock(cache_root(), self.key):
            loaded = _load(self.path, device, config)  # another process published it while we waited
            if loaded is not None:
                mark_used(self.path)
                return loaded
            computed = compute()
            if _storable(computed):
                _publish(self.path, self.key, self.inputs, computed)
            return computed


def _storable(prefixes) -> bool:
    return all(all(type(layer).__name__ == "DynamicLayer" for layer in getattr(p.cache, "layers", [None]))
               for p in prefixes)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU as its own storage (``torch.save`` writes a view's whole storage)."""
    t = t.detach().cpu()
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _publish(final: Path, key: str, inputs: dict, prefixes) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(prefixes):
        for n, layer in enumerate(p.cache.layers):
            tensors[f"{i}.k.{n}"], tensors[f"{i}.v.{n}"] = _own(layer.keys), _own(layer.values)
        tensors[f"{i}.last_hidden"] = _own(p.last_hidden)
        tensors[f"{i}.mask"], tensors[f"{i}.next_pos"] = _own(p.mask), _own(p.next_pos)
    meta = {"key": key, "format": FORMAT, "inputs": inputs, "batches": len(prefixes),
            "layers": len(prefixes[0].cache.layers) if prefixes else 0,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    with publishing_dir(final) as folder:
        torch.save(tensors, folder / "prefix.pt")
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _load(path: Path, device: torch.device, config=None) -> list | None:
    """The published prefixes at ``path``, or None when there is no complete entry. The cache
    layers hold the stored tensors themselves (what ``DynamicLayer.update`` would hold after
    the prefill, without its copy)."""
    from transformers.cache_utils import DynamicCache

    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        tensors = torch.load(path / "prefix.pt", mmap=True, weights_only=True, map_location=device)
    except (OSError, ValueError, RuntimeError):
        return None
    out = []
    for i in range(meta["batches"]):
        cache = DynamicCache(config=config)
        for n in range(meta["layers"]):
            k, v = tensors.pop(f"{i}.k.{n}"), tensors.pop(f"{i}.v.{n}")
            cache.update(k[:, :, :0], v[:, :, :0], n)  # makes and initialises the layer (dtype, device)
            cache.layers[n].keys, cache.layers[n].values = k, v
        out.append(Prefix(cache, tensors.pop(f"{i}.last_hidden"), tensors.pop(f"{i}.mask"), tensors.pop(f"{i}.next_pos")))
    return out


def list_entries() -> list[Published]:
    """The published entries, by key. Reads only: creates nothing, stamps nothing."""
    return diskcache.published(cache_root())


def clear(keys: Sequence[str] = (), *, everything: bool = False) -> list[tuple[str, int]]:
    """Remove the entries with these whole keys, or every entry; returns (key, bytes freed)."""
    return diskcache.clear(cache_root(), keys, everything=everything)
