"""Teacher fine-tuning: the paper's per-task teacher SFT, done once and cached.

Before a suite with ``finetune`` distils anything, its teacher is fine-tuned on the suite's
training split with the ``ce`` objective (cross-entropy on the reference responses) on **the
same trainer** as distillation (kdbench/engine/trainer.py: packed batches, loss from hidden
states at response positions, fused AdamW, the warm-up + cosine schedule, bf16 autocast where
native) for the budget in ``suite.finetune`` (a TrainSpec). The result is saved in bf16 (it
only runs inference) as a safetensors folder under ``cache_dir()/teachers/<suite>-<key>``,
where ``key`` fingerprints the base teacher by content, the fine-tuning spec, the prompt
format and the training data, so any change retrains and nothing stale is reused. The folder
is written to a temporary sibling and renamed into place, so a killed fine-tune never leaves a
half-written teacher behind.

Reproducibility: on one CPU kind the fine-tune is deterministic (fixed data order and seed;
CPU kernels have no atomics; micro's Llama-shaped teacher has no dropout, and a GPT-2 teacher's
0.1 draws from the seeded generator); on a GPU only under ``--deterministic`` (docs/engine.md
"Determinism"). Across machine kinds float rounding differs, so the fine-tuned teacher's content
fingerprint and the device kind (``runs.config.reference_fingerprint``) keep results of
different fine-tunes apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from kdbench.data.batching import encode
from kdbench.device import cache_device
from kdbench.diskcache import cache_dir, publishing_dir
from kdbench.engine.batches import PackedBatches
from kdbench.engine.trainer import LogHooks, train
from kdbench.models import fingerprint, load_causal_lm, load_tokenizer

FINETUNE_FORMAT = 2  # 2: fine-tuned on the engine's trainer (packed batches, loss from hidden states)


def data_digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, list(e.references)]).encode())
    return h.hexdigest()[:16]


def finetuned_path(base: Path, suite_name: str, spec, train, system_prompt: str | None = None, seed: int = 0,
                   device: torch.device | None = None) -> Path:
    """Where the fine-tune of (base, spec, data, seed, prompt format) is cached. On a GPU the
    device kind (name, compute capability) is in the key too: a cache shared by CPU and GPU
    machines (one home on a cluster) must not hand one's fine-tune to the other, whose floats
    differ. On the CPU it is left out, so every CPU machine keeps the fine-tune it has cached
    (4-13 min each) under the key it was made with; CPU kinds are told apart downstream, by the
    fine-tuned teacher's content and the device kind in the reference fingerprint."""
    extra = {"finetune": dataclasses.asdict(spec), "data": data_digest(train), "seed": seed,
             "system_prompt": system_prompt, "format": FINETUNE_FORMAT}
    if device is not None and device.type != "cpu":
        extra["device"] = cache_device(device)
    return cache_dir() / "teachers" / f"{suite_name}-{fingerprint(base, extra)}"


def finetune_teacher(base: Path, suite_name: str, spec, train_examples, device: torch.device, *,
                     system_prompt: str | None = None, seed: int = 0, progress: bool = True) -> Path:
    """The fine-tuned teacher folder for (base, spec, data); trains and caches it on first use."""
    from kdbench.registry import get_objective

    out = finetuned_path(base, suite_name, spec, train_examples, system_prompt, seed, device)
    if (out / "config.json").is_file():
        print(f"[kdbench] fine-tuned teacher from cache: {out}")
        return out
    tok = load_tokenizer(base)
    model = load_causal_lm(base).to(device)
    spec = dataclasses.replace(spec, steps=spec.steps_for(len(train_examples)), epochs=None)
    encoded = [(e.id, encode(tok, e.prompt, e.references[0], spec.max_prompt_tokens, spec.max_tokens, system_prompt))
               for e in train_examples]
    curve: list[dict] = []
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = train(model=model, objective=get_objective("ce"),
                   batches=PackedBatches(encoded, spec.batch_size, seed, tok.pad_token_id), teacher=None, spec=spec,
                   device=device, hooks=LogHooks(lambda step, p: curve.append({"step": step, "loss": p["loss"],
                                                                               "elapsed_s": p["elapsed_s"]})),
                   progress=progress)
    wall = time.perf_counter() - t0
    if (out / "config.json").is_file():  # another process finished the same fine-tune meanwhile
        return out
    with publishing_dir(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)  # a frozen teacher: bf16 halves the cache
        tok.save_pretrained(tmp)
        (tmp / "kdbench_finetune.json").write_text(json.dumps(
            {"base_weights": fingerprint(base), "suite": suite_name, "spec": dataclasses.asdict(spec),
             "n_train": len(train_examples), "data_digest": data_digest(train_examples), "seed": seed,
             "system_prompt": system_prompt, "wall_time_s": wall, "tokens": result.train_tokens,
             "tokens_per_s": result.tokens_per_s, "curve": curve}, indent=1))
    print(f"[kdbench] fine-tuned the teacher for {spec.steps} steps in {wall:.0f}s -> {out}")
    return out
