"""SeqKD's training set: the teacher's own responses to the training prompts (Kim & Rush 2016,
*Sequence-Level Knowledge Distillation*), generated once and kept on disk (the ``seqkd``
sampler, kdbench/engine/samplers.py).

The set depends on the teacher and the prompts, not on the run: it is generated once per suite
version and teacher group and read by every objective and seed after it, like the teacher
cache. Each example keeps its prompt; its response is the teacher's, decoded by evaluation's
decoder (kdbench/evaluation/sampling.py ``decode``: KV cache, batched, the suite's precision)
greedily (``greedy=1``, the default: the teacher's mode, what SeqKD's beam search
approximates) or sampled with the suite's sampling settings and draws keyed by (seed 0,
``<example id>@seqkd``, position). A response ends at the end-of-turn token (kept) or at the
suite's ``max_new_tokens`` and sequence limit (cut, and counted). Its id is
``<example id>@seqkd``: a new sequence, so the teacher cache builds its own entry over the set
(kdbench/engine/teacher_cache.py ``for_training``) and training then runs exactly as ``off`` on
these examples.

**Entry** (kdbench/diskcache.py: named by content, built once under a lock, published by a
rename): ``$KDBENCH_CACHE/seqkd/<key>/responses.json`` (example id -> response token ids) and
``meta.json``. The key is the digest of the teacher's weights and tokenizer, the prompts, the
decoding (greedy or the sampling settings and seed), the length limits, the precision and the
device (its kind on a GPU, :func:`kdbench.device.cache_device`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from kdbench import diskcache
from kdbench.data.batching import Encoded
from kdbench.device import autocast_context, cache_device, inference_dtype
from kdbench.diskcache import Published, cache_home, digest, lock, mark_used, publishing_dir
from kdbench.evaluation.sampling import decode

FORMAT = 1
SEED = 0  # the sampled set's draws: one set per suite version and teacher group, whatever the run's seed


def cache_root() -> Path:
    """``$KDBENCH_CACHE/seqkd``, not created here (a builder's lock creates it)."""
    return cache_home() / "seqkd"


def key_inputs(teacher_identity: dict, examples: Sequence[tuple[str, Encoded]], *, greedy: bool, sampling: dict,
               max_new_tokens: int, max_tokens: int, device: torch.device, bf16: bool) -> dict:
    """What a set depends on (its key is their digest)."""
    prompts = [[i, e.ids[:e.n_prompt]] for i, e in examples]
    decoding = {"greedy": True} if greedy else {"greedy": False, "seed": SEED, **sampling}
    return {"teacher": teacher_identity, "prompts": digest(prompts, 64), "decoding": decoding,
            "max_new_tokens": max_new_tokens, "max_tokens": max_tokens,
            "dtype": str(inference_dtype(device, bf16)).replace("torch.", ""), "device": cache_device(device)}


def materialise(teacher: torch.nn.Module | Callable[[], torch.nn.Module], teacher_identity: dict,
                examples: Sequence[tuple[str, Encoded]], *, greedy: bool, sampling: dict, max_new_tokens: int,
                max_tokens: int, eos_id: int, pad_id: int, batch_size: int, device: torch.device, bf16: bool,
                progress: bool = True) -> tuple[list[tuple[str, Encoded]], dict, float]:
    """The SeqKD training set of ``examples``: its entry read, or generated and published first
    (``teacher``, a model or a function loading one, runs only then). Returns ``(examples with
    the teacher's responses, what the run records about the set, seconds spent generating)``."""
    inputs = key_inputs(teacher_identity, examples, greedy=greedy, sampling=sampling, max_new_tokens=max_new_tokens,
                        max_tokens=max_tokens, device=device, bf16=bf16)
    key = digest({"seqkd_format": FORMAT, **inputs})
    path = cache_root() / key
    built_s = 0.0
    responses = _read(path)
    if responses is None:
        with lock(cache_root(), key):
            responses = _read(path)  # another process published it while we waited
            if responses is None:
                t0 = time.perf_counter()
                model = teacher() if callable(teacher) and not isinstance(teacher, torch.nn.Module) else teacher
                responses = _generate(model, examples, greedy=greedy, sampling=sampling,
                                      max_new_tokens=max_new_tokens, max_tokens=max_tokens, eos_id=eos_id,
                                      pad_id=pad_id, batch_size=batch_size, device=device, bf16=bf16,
                                      progress=progress)
                built_s = time.perf_counter() - t0
                _write(path, key, inputs, responses, built_s)
    if not built_s:
        mark_used(path)
    out = [(f"{i}@seqkd", Encoded(e.ids[:e.n_prompt] + responses[i], e.n_prompt)) for i, e in examples]
    cut = sum(1 for i, _ in examples if responses[i][-1:] != [eos_id])
    described = {"kind": "seqkd", "key": key, "examples": len(out), "decoding": inputs["decoding"],
                 "generated_tokens": sum(len(r) for r in responses.values()), "cut_responses": cut,
                 "ids": "<example id>@seqkd"}
    return out, described, built_s


def _generate(model, examples, *, greedy, sampling, max_new_tokens, max_tokens, eos_id, pad_id, batch_size, device,
              bf16, progress) -> dict[str, list[int]]:
    """Every example's teacher response. One decode for all at the suite's ``max_new_tokens``,
    then each cut to its own room under ``max_tokens``: the draws are keyed per prompt and
    position, so a cut response is what a shorter decode of that prompt gives."""
    prompts = [e.ids[:e.n_prompt] for _, e in examples]
    if progress:
        print(f"[kdbench] seqkd: generating the teacher's responses to {len(prompts)} training prompts "
              f"({'greedy' if greedy else 'sampled'}, up to {max_new_tokens} tokens)", flush=True)
    with torch.no_grad(), autocast_context(device, bf16):
        decoded = decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                         seed=None if greedy else SEED, keys=[f"{i}@seqkd" for i, _ in examples], greedy=greedy,
                         device=device, batch_size=batch_size, **({} if greedy else sampling))
    return {i: r[:max(1, max_tokens - len(p))] for (i, _), p, r in zip(examples, prompts, decoded)}


def _read(path: Path) -> dict[str, list[int]] | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        return json.loads((path / "responses.json").read_text())
    except (OSError, ValueError):
        return None


def _write(final: Path, key: str, inputs: dict, responses: dict, built_s: float) -> None:
    with publishing_dir(final) as folder:
        (folder / "responses.json").write_text(json.dumps(responses))
        meta = {"key": key, "format": FORMAT, "inputs": inputs, "examples": len(responses),
                "generation_s": round(built_s, 3), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def list_entries() -> list[Published]:
    """The published sets, by key. Reads only."""
    return diskcache.published(cache_root())


def clear(keys: Sequence[str] = (), *, everything: bool = False) -> list[tuple[str, int]]:
    """Remove the sets with these whole keys, or every set; returns (key, bytes freed)."""
    return diskcache.clear(cache_root(), keys, everything=everything)
