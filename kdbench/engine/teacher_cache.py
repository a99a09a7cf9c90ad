"""The exact teacher cache: the teacher's final hidden states at counted positions, on disk.

Computed once per (teacher, tokenizer, encoded data, lengths, dtype, device kind) and reused
by every later off-policy run of the suite, so training never runs the teacher's
transformer body. Logits are recomputed through the teacher's head (stored with the entry),
so a run sees the live teacher's full distribution, not a top-k compression.

Layout of an entry ``$KDBENCH_CACHE/teacher-hidden/<key>/``::

    hidden.bin       [n_rows, d] raw rows (bf16 stored as int16 bits, or float32), memory-mapped
    index.json       example id -> [first row, number of rows, tokens digest] (rows in counted-position
                     order; the digest of the example's tokens, checked on every read)
    head.safetensors the teacher's output head (weight [V, d], bias) in float32
    meta.json        key, its inputs, shape, dtype, sizes, build time   (written last)

**Key** (content-addressed): sha256 of the cache format version, the teacher weights digest,
the tokenizer digest (vocabulary, special tokens, chat template), the digest of the encoded
training data (every example id, token id and prompt length), the max lengths, the dtype and
the device kind. Any change is a new entry; a stale one is never read. Within an entry, rows
are handed out only for the tokens they were computed from: a batch whose example carries other
tokens under a cached id (an on-policy sampler's fresh response, say) is refused, even when its
length matches.

**Concurrency**: a builder holds an exclusive ``flock`` on ``<key>.lock`` and writes into a
temporary sibling folder that is renamed into place when complete, so concurrent runs
building one entry build it once and a reader never sees a half-written entry (the lock, the
publishing, the read stamp, the listing and removal are every cache's: kdbench/diskcache.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdbench import diskcache
from kdbench.data.batching import Encoded, counted_span, pack
from kdbench.diskcache import Published, cache_home, digest, lock, mark_used, publishing_dir
from kdbench.device import cache_device, inference_dtype
from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import CachedTeacher, TeacherHead
from kdbench.modeling import final_hidden, head_logits_check, head_params

CACHE_FORMAT = 2  # 2: each index row carries its example's tokens digest (format 1 entries are listed, not read)
BUILD_BATCH = 16  # examples per teacher forward while building (packed)
_DTYPES = {"bfloat16": (torch.bfloat16, np.int16), "float32": (torch.float32, np.float32)}


def cache_root() -> Path:
    """``$KDBENCH_CACHE/teacher-hidden``, not created here (a builder's lock creates it; a listing
    writes nothing)."""
    return cache_home() / "teacher-hidden"


def data_digest(examples: Sequence[tuple[str, Encoded]]) -> str:
    """Digest of the encoded training data: ids, token ids and prompt lengths, in order. Streamed
    example by example (not :func:`kdbench.diskcache.digest` of one list): its value is in every
    stored entry's key, so its formula stays."""
    h = hashlib.sha256()
    for ex_id, e in examples:
        h.update(json.dumps([ex_id, e.n_prompt, e.ids]).encode())
    return h.hexdigest()


def tokens_digest(e: Encoded) -> str:
    """What an example's cached rows were computed from: its prompt length and token ids."""
    return digest([e.n_prompt, e.ids], 16)


def cache_key(inputs: dict) -> str:
    """The entry key: the :func:`~kdbench.diskcache.digest` of ``inputs`` and the format version."""
    return digest({"format": CACHE_FORMAT, **inputs})


def key_inputs(teacher_identity: dict, examples: Sequence[tuple[str, Encoded]], train_spec, system_prompt: str,
               device: torch.device, *, role: str | None = None) -> dict:
    """What an entry depends on (its key is their digest): the teacher's weights and tokenizer,
    the encoded examples, the encoding limits and system prompt the examples were made with, the
    device kind and the dtype the rows are stored in. ``role`` marks an entry that is not training
    data (a task's test references: ``"test:<task>"``), so the two never share a key."""
    dtype = str(inference_dtype(device, train_spec.bf16_autocast)).replace("torch.", "")
    inputs = {"teacher": teacher_identity, "data": data_digest(examples),
              "max_prompt_tokens": train_spec.max_prompt_tokens, "max_tokens": train_spec.max_tokens,
              "system_prompt": system_prompt, "dtype": dtype, "device": cache_device(device)}
    if role is not None:
        inputs["role"] = role
    return inputs


def examples_for_run(examples: Sequence[tuple[str, Encoded]], train_spec, seed: int) -> list[tuple[str, Encoded]]:
    """The entry policy for a training run: every example when the run covers at least half the
    training set (one entry then serves every seed and objective of the suite), else only those
    its batches touch (a quick ``--steps N`` run caches a few batches, not the suite)."""
    if train_spec.steps * train_spec.batch_size >= len(examples) // 2:
        return list(examples)
    src = PackedBatches(examples, train_spec.batch_size, seed)
    touched: set[str] = set()
    for _ in range(train_spec.steps):
        touched.update(next(src).example_ids)
    return [(i, e) for i, e in examples if i in touched]


def for_training(teacher, teacher_identity: dict, examples: Sequence[tuple[str, Encoded]], train_spec,
                 system_prompt: str, device: torch.device, seed: int, *, progress: bool = True
                 ) -> tuple[CachedTeacher, dict, float]:
    """The cached teacher a training run with ``seed`` reads: its entry found or built (``teacher``,
    a model or a function loading one, runs only when it must be built). Returns ``(source, what
    the run records about it, seconds spent building)``."""
    chosen = examples_for_run(examples, train_spec, seed)
    inputs = key_inputs(teacher_identity, chosen, train_spec, system_prompt, device)
    key = cache_key(inputs)
    entry, built_s = get_or_build(key, inputs, teacher, chosen, device, progress=progress)
    described = {"kind": "cache", "key": key, "rows": entry.meta["n_rows"], "examples": entry.meta["n_examples"]}
    return CachedTeacher(entry, device), described, built_s


@dataclass
class Entry(Published):
    """A published teacher-cache entry (read-only)."""

    index: dict

    @classmethod
    def open(cls, path: Path) -> "Entry | None":
        """The entry at ``path`` if it is complete and consistent, else None."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            index = json.loads((path / "index.json").read_text())
            torch_dtype, np_dtype = _DTYPES[meta["dtype"]]
            expected = meta["n_rows"] * meta["d"] * np.dtype(np_dtype).itemsize
            if meta.get("format") != CACHE_FORMAT or (path / "hidden.bin").stat().st_size != expected:
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or damaged
            return None
        return cls(path, meta, index)

    def _array(self) -> np.ndarray:
        arr = getattr(self, "_mm", None)
        if arr is None:
            _, np_dtype = _DTYPES[self.meta["dtype"]]
            arr = np.memmap(self.path / "hidden.bin", dtype=np_dtype, mode="r",
                            shape=(self.meta["n_rows"], self.meta["d"]))
            self._mm = arr
        return arr

    def rows(self, example_ids: Sequence[str], encoded: Sequence[Encoded] | None = None) -> torch.Tensor:
        """The cached rows of these examples, concatenated in order: ``[N, d]``. With ``encoded``
        (the batch's tokens, in the same order) each example must be the one its rows were
        computed from; another sequence under a cached id is refused."""
        arr = self._array()
        try:
            spans = [self.index[i] for i in example_ids]
        except KeyError as exc:
            raise KeyError(f"example {exc.args[0]!r} is not in teacher cache {self.key}") from None
        if encoded is not None:
            for ex_id, e, span in zip(example_ids, encoded, spans):
                if span[2] != tokens_digest(e):
                    raise ValueError(f"teacher cache {self.key} holds the teacher's states of other tokens for example "
                                     f"{ex_id!r} than this batch has (sequences it never saw, e.g. sampled on-policy, "
                                     f"need a live teacher)")
        out = np.concatenate([arr[a:a + n] for a, n, _ in spans]) if spans else arr[:0]
        t = torch.from_numpy(np.ascontiguousarray(out))
        torch_dtype, _ = _DTYPES[self.meta["dtype"]]
        return t.view(torch_dtype) if torch_dtype == torch.bfloat16 else t

    def head(self) -> TeacherHead:
        from safetensors.torch import load_file

        tensors = load_file(str(self.path / "head.safetensors"))
        return TeacherHead(tensors["weight"], tensors.get("bias"))

def lookup(key: str) -> Entry | None:
    return Entry.open(cache_root() / key)


def get_or_build(key: str, inputs: dict, teacher, examples: Sequence[tuple[str, Encoded]], device: torch.device,
                 *, progress: bool = True, log=print) -> tuple[Entry, float]:
    """The entry for ``key``, built from ``teacher`` (a model, or a zero-argument function
    returning one: it is loaded only when the entry must be built) over ``examples`` if it does
    not exist yet. Returns ``(entry, seconds spent building; 0.0 when it was reused)``."""
    entry = lookup(key)
    if entry is not None:
        mark_used(entry.path)
        return entry, 0.0
    with lock(cache_root(), key):
        entry = lookup(key)  # another process built it while we waited
        if entry is not None:
            mark_used(entry.path)
            return entry, 0.0
        t0 = time.perf_counter()
        final = cache_root() / key
        model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
        with publishing_dir(final) as folder:
            _write(folder, key, inputs, model, examples, device, progress)
        seconds = time.perf_counter() - t0
        entry = Entry.open(final)
        assert entry is not None, f"teacher cache entry {final} failed its own consistency check"
        log(f"[kdbench] teacher cache {key}: {entry.meta['n_rows']} positions of {len(examples)} examples in "
            f"{seconds:.0f}s ({entry.size_bytes / 2**20:.0f} MB)")
        return entry, seconds


@torch.inference_mode()
def _write(folder: Path, key: str, inputs: dict, teacher, examples, device, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    teacher.eval()
    n_rows = sum(len(counted_span(e)) for _, e in examples)
    d = head_params(teacher)[0].shape[1]
    dtype_name = "bfloat16" if next(teacher.parameters()).dtype == torch.bfloat16 else "float32"
    torch_dtype, np_dtype = _DTYPES[dtype_name]
    arr = np.memmap(folder / "hidden.bin", dtype=np_dtype, mode="w+", shape=(max(n_rows, 1), d))
    index: dict[str, list] = {}
    row = 0
    bar = tqdm(range(0, len(examples), BUILD_BATCH), desc="teacher cache", disable=not progress, dynamic_ncols=True)
    for start in bar:
        picked = list(examples[start:start + BUILD_BATCH])
        batch = pack([e for _, e in picked], [i for i, _ in picked]).to(device)
        h = final_hidden(teacher, batch)
        if start == 0:
            _check_head(teacher, batch, h, dtype_name)
        h = h.to(torch_dtype).cpu()
        bits = h.view(torch.int16).numpy() if torch_dtype == torch.bfloat16 else h.numpy()
        arr[row:row + bits.shape[0]] = bits
        offset = 0
        for ex_id, e in picked:
            n = len(counted_span(e))
            index[ex_id] = [row + offset, n, tokens_digest(e)]
            offset += n
        row += bits.shape[0]
    bar.close()
    arr.flush()
    del arr
    if n_rows == 0:  # keep the file size consistent with n_rows = 0
        (folder / "hidden.bin").write_bytes(b"")
    head = TeacherHead(*head_params(teacher))
    tensors = {"weight": head.weight.float().contiguous().cpu()}  # the file keeps float32
    if head.bias is not None:
        tensors["bias"] = head.bias.contiguous().cpu()
    save_file(tensors, str(folder / "head.safetensors"))
    (folder / "index.json").write_text(json.dumps(index))
    meta = {"key": key, "format": CACHE_FORMAT, "inputs": inputs, "n_rows": n_rows, "d": d, "dtype": dtype_name,
            "n_examples": len(examples), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # last: an entry without it is incomplete


HEAD_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}  # the model's own logits vs hidden @ W^T, per dtype


def _check_head(teacher, batch, hidden, dtype_name: str) -> None:
    """Cached logits are ``hidden @ W^T``: refuse a teacher whose own logits are something else."""
    got = head_logits_check(teacher, batch, hidden)
    if got["rel_err"] > HEAD_RTOL[dtype_name]:
        raise ValueError(f"the teacher's logits are not a linear map of its final hidden states (relative error "
                         f"{got['rel_err']:.2e} > {HEAD_RTOL[dtype_name]:g}: soft-capping or a logit scale?); kdbench makes "
                         f"teacher logits from hidden states and needs a plain linear output head")


def list_entries() -> list[Published]:
    """The published entries: usable ones as :class:`Entry`, and those an earlier cache format
    wrote or that are damaged (never read; listed so that ``kdbench cache clear`` can remove
    them). Reads only: creates nothing, stamps nothing."""
    return [Entry.open(p.path) or p for p in diskcache.published(cache_root())]


def clear(keys: Sequence[str] = (), *, everything: bool = False) -> list[tuple[str, int]]:
    """Remove the entries with these whole keys, or every entry; returns (key, bytes freed)."""
    return diskcache.clear(cache_root(), keys, everything=everything)
