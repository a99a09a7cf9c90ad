"""Benchmark 4: the evaluator's generation tokens/s against a bare ``model.generate`` loop.

Same model (the micro student, or the teacher with --model teacher), same prompts (the micro
suite's test prompts in its chat format), same batch size, same sampling protocol and seed.
The bare loop tokenises each batch with the tokenizer's own left padding and calls
``generate``; the evaluator (kdbench.evaluation.decoder.generate_ids) reuses prompt ids tokenised once.
Generated tokens = new tokens up to and including end-of-turn. Run alone:

    .venv/bin/python benchmarks/bench_generate.py --prompts 100 --batch 50
"""

from __future__ import annotations

import argparse
import sys
import time

from common import add_device_option, bench_device, micro_setup, report  # noqa: F401  (sets sys.path)

import torch  # noqa: E402


def bare_loop(model, tok, texts, spec, seed, batch):
    tok.padding_side = "left"
    torch.manual_seed(seed)
    n = 0
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                             max_new_tokens=spec.max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--model", choices=("student", "teacher"), default="student")
    ap.add_argument("--repeats", type=int, default=2)
    add_device_option(ap)
    args = ap.parse_args()

    import dataclasses

    from kdbench.data.batching import chat_prompt
    from kdbench.data.micro import build_splits
    from kdbench.device import default_threads
    from kdbench.evaluation.decoder import generate_ids
    from kdbench.suites import MICRO

    default_threads()
    device = bench_device(args.device)
    teacher, new_student, tok, _, _ = micro_setup(device)
    model = (teacher if args.model == "teacher" else new_student()).eval()
    spec = dataclasses.replace(MICRO.eval, batch_size=args.batch)
    test = sorted(build_splits(MICRO.data["valid_frac"], MICRO.data["test_frac"])["test"], key=lambda e: e.id)
    texts = [chat_prompt(tok, e.prompt) for e in test[: args.prompts]]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    rates = {"bare": [], "evaluator": []}
    with torch.no_grad():
        for rep in range(args.repeats):  # alternate the arms so drifting load hits both
            t0 = time.perf_counter()
            n = bare_loop(model, tok, texts, spec, 10 + rep, args.batch)
            rates["bare"].append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = generate_ids(model, ids, spec, 10 + rep, device, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            rates["evaluator"].append(sum(len(o) for o in out) / (time.perf_counter() - t0))
            print(f"[bench_generate] repeat {rep}: bare {rates['bare'][-1]:.1f} tok/s, evaluator "
                  f"{rates['evaluator'][-1]:.1f} tok/s", flush=True)
    bare, ev = max(rates["bare"]), max(rates["evaluator"])
    report("generation tokens/s (micro)", {"model": args.model, "prompts": args.prompts, "batch": args.batch,
                                           "max_new_tokens": spec.max_new_tokens, "bare_tokens_per_s": round(bare, 1),
                                           "evaluator_tokens_per_s": round(ev, 1),
                                           "evaluator / bare": round(ev / bare, 3), "all": rates},
           "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
