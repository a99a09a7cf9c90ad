"""Teacher fine-tuning: the paper's per-task teacher SFT, done once and cached.

Before a suite with ``finetune`` distils anything, its teacher is fine-tuned on the suite's
training split with cross-entropy on the reference responses (full fine-tuning, AdamW, the
warm-up + cosine schedule of kdbench/train.py, bf16 autocast where native) for the budget in
``suite.finetune`` (a TrainSpec). The result is saved (bf16: it only runs inference) as a safetensors folder under
``cache_dir()/teachers/<suite>-<key>``, where ``key`` fingerprints the base teacher, the
fine-tuning spec and the training data (prompts, references, chat format), so any change
retrains and nothing stale is reused. The folder is written to a temporary sibling and
renamed into place, so a killed fine-tune never leaves a half-written teacher behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from kdbench.data.batching import batches, encode
from kdbench.models import cache_dir, publishing_dir, fingerprint, load_causal_lm, load_tokenizer
from kdbench.train import autocast_context, lr_at


def data_digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, list(e.references)]).encode())
    return h.hexdigest()[:16]


def resolved_steps(spec, n_train: int) -> int:
    """A TrainSpec's budget in steps (``epochs`` converted with the training-set size)."""
    if spec.epochs:
        return max(1, math.ceil(spec.epochs * n_train / spec.batch_size))
    return spec.steps


def adamw(params, spec, device: torch.device):
    """AdamW, fused where torch has a fused kernel for the device (15% faster per step on CPU)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def finetuned_path(base: Path, suite_name: str, spec, train) -> Path:
    key = fingerprint(base, {"finetune": dataclasses.asdict(spec), "data": data_digest(train)})
    return cache_dir() / "teachers" / f"{suite_name}-{key}"


def finetune_teacher(base: Path, suite_name: str, spec, train, device: torch.device, *, seed: int = 0,
                     progress: bool = True) -> Path:
    """The fine-tuned teacher folder for (base, spec, data); trains and caches it on first use."""
    out = finetuned_path(base, suite_name, spec, train)
    if (out / "config.json").is_file():
        print(f"[kdbench] fine-tuned teacher from cache: {out}")
        return out
    from tqdm.auto import tqdm

    tok = load_tokenizer(base)
    model = load_causal_lm(base).to(device).train()
    steps = resolved_steps(spec, len(train))
    spec = dataclasses.replace(spec, steps=steps)
    enc = [encode(tok, e.prompt, e.references[0], spec.max_prompt_tokens, spec.max_tokens) for e in train]
    it = batches(enc, spec.batch_size, seed, tok.pad_token_id)
    opt = adamw(model.parameters(), spec, device)
    torch.manual_seed(seed)
    t0, tokens, log = time.perf_counter(), 0, []
    bar = tqdm(range(steps), desc=f"fine-tune teacher ({suite_name})", disable=not progress, dynamic_ncols=True)
    for step in bar:
        b = {k: v.to(device) for k, v in next(it).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        # The head runs only at the positions some row counts (short answers: a fraction of the
        # sequence); the loss is the same, the full-vocabulary logits are not materialised.
        cols = b["loss_mask"].any(0).nonzero().squeeze(-1)
        with autocast_context(device, spec.bf16_autocast):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=cols).logits
        labels, mask = b["labels"][:, cols], b["loss_mask"][:, cols]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
        if not torch.isfinite(loss):
            raise RuntimeError(f"teacher fine-tuning diverged: loss {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        tokens += int(b["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % spec.log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": loss.item(), "elapsed_s": time.perf_counter() - t0})
    bar.close()
    wall = time.perf_counter() - t0
    if (out / "config.json").is_file():  # another process finished the same fine-tune meanwhile
        return out
    with publishing_dir(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)  # a frozen teacher: bf16 halves the cache
        tok.save_pretrained(tmp)
        (tmp / "kdbench_finetune.json").write_text(json.dumps(
            {"base": str(base), "suite": suite_name, "spec": dataclasses.asdict(spec), "n_train": len(train),
             "data_digest": data_digest(train), "wall_time_s": wall, "tokens": tokens, "curve": log}, indent=1))
    print(f"[kdbench] fine-tuned the teacher for {steps} steps in {wall:.0f}s -> {out}")
    return out
