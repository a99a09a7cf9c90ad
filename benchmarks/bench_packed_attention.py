#!/usr/bin/env python
"""Packed attention, dense mask vs per sequence: the student's forward + backward on packed rows.

kdbench runs a packed row (several sequences end to end, positions restarting per sequence)
either through transformers' SDPA with the block-diagonal L x L mask it builds ("dense", the CPU's
setting) or through SDPA once per sequence, causal, with no mask ("per_sequence",
kdbench/modeling.py; the CUDA setting). This times both on the micro standard student's shape
(SmolLM2-135M's config with 24 blocks, random weights: the time does not depend on them) and the
micro suite's real packed batches (8 examples a row, seed 0's order), under the device's bf16
autocast, with activation checkpointing on (the CPU's default) and off. Arms alternate batch by
batch in one process, so machine load hits both alike; the ratio is what to read.

    python benchmarks/bench_packed_attention.py                  # cpu, 6 batches x 3 rounds
    python benchmarks/bench_packed_attention.py --device cuda --batches 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import machine  # noqa: F401  (sets sys.path; mimalloc as the kdbench command runs)

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=24, help="student blocks (micro's student: 24)")
    ap.add_argument("--batches", type=int, default=6, help="packed batches per round")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the batches (the first is warm-up)")
    args = ap.parse_args(argv)

    from transformers import AutoConfig, LlamaForCausalLM

    from kdbench.data.batching import encode
    from kdbench.data.micro import build_splits
    from kdbench.device import autocast_context, native_bf16
    from kdbench.engine.batches import PackedBatches
    from kdbench.models import load_tokenizer, prepare_teacher
    from kdbench.modeling import final_hidden, packed_attention, set_activation_checkpointing
    from kdbench.suites import MICRO

    device = torch.device(args.device)
    path = prepare_teacher(MICRO.teacher)
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = args.blocks
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device).train()
    tok = load_tokenizer(path)
    spec = MICRO.train
    train = build_splits(MICRO.data["valid_frac"], MICRO.data["test_frac"])["train"]
    enc = [(e.id, encode(tok, e.prompt, e.references[0], spec.max_prompt_tokens, spec.max_tokens)) for e in train]
    src = PackedBatches(enc, spec.batch_size, 0, tok.pad_token_id)
    batches = [next(src).to(device) for _ in range(args.batches)]
    tokens = [b.n_tokens for b in batches]

    def step(batch) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast_context(device, spec.bf16_autocast):
            h = final_hidden(model, batch)
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    arms = [(mode, ckpt) for ckpt in (True, False) for mode in ("dense", "per_sequence")]
    times: dict = {arm: [] for arm in arms}
    for rnd in range(args.rounds):
        for b in batches:
            for mode, ckpt in arms:
                set_activation_checkpointing(model, ckpt)
                with packed_attention(model, mode) as used:
                    assert used == mode
                    dt = step(b)
                if rnd:  # round 0 warms up
                    times[(mode, ckpt)].append(dt)
    set_activation_checkpointing(model, False)

    results = {}
    for ckpt in (True, False):
        dense = sum(times[("dense", ckpt)])
        per = sum(times[("per_sequence", ckpt)])
        key = "checkpointing" if ckpt else "activations kept"
        results[key] = {"dense_s_per_batch": dense / len(times[("dense", ckpt)]),
                        "per_sequence_s_per_batch": per / len(times[("per_sequence", ckpt)]),
                        "per_sequence_over_dense": per / dense,
                        "median_ratio_per_batch": statistics.median(
                            p / d for p, d in zip(times[("per_sequence", ckpt)], times[("dense", ckpt)]))}
    out = {"benchmark": "packed attention: dense mask vs per sequence (forward + backward)",
           "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "bf16_autocast": spec.bf16_autocast and native_bf16(device), "blocks": args.blocks,
           "batches": args.batches, "timed_rounds": args.rounds - 1, "tokens_per_batch": tokens,
           "results": results, "machine": machine(),
           "command": "python benchmarks/bench_packed_attention.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
