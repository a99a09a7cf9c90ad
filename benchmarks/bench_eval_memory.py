"""Benchmark: evaluation memory is one batch of prompts, whatever the number of prompts.

A GPT-2-shaped teacher / student pair built from config (transformers ``GPT2Config``, random
weights; teacher 12 blocks, student 6, width ``--width``), the embedded SmolLM2 byte-level BPE
tokenizer (vocabulary 49,152; no GPT-2 tokenizer is at hand offline) with its chat template
removed, as GPT-2 has none. Prompts: S-NI, MiniLLM's ``sni/minillm/valid.jsonl`` under the data
root (``--data-dir``, default ``$KDBENCH_DATA_DIR`` or ../shared/data), Alpaca-formatted,
left-truncated to ``--max-prompt-tokens``. The student is evaluated through
``kdbench.evaluation.protocol.evaluate_model`` as a run evaluates it: sampled decodes, the
teacher's scores through its stored prompt cache (built on first use, in a fresh
``$KDBENCH_CACHE``), the reference KL through both prompt caches.

Two arms, the same batch size, ``--small`` and ``--large`` batches of prompts (4 and 40), each
in a fresh process with an empty ``$KDBENCH_CACHE`` (the tokenizer folder comes from the usual
one): models and inputs are built, freed pages handed back (``kdbench.device.release_memory``:
what the allocator keeps from set-up would otherwise absorb the evaluation's first hundreds of
MB), the kernel's peak-RSS mark reset (``/proc/self/clear_refs`` 5) and the resident set taken
as the baseline (interpreter, models, inputs); after the evaluation, VmHWM minus that baseline
is the evaluation's own peak.
Prints both peaks and their ratio (target <= 1.2x: memory does not grow with the prompts).
``--compare-head`` runs both arms again with the evaluation modules of git HEAD (read with
``git show``, nothing checked out), to show what they cost before.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_memory.py [--compare-head]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from common import ROOT, machine  # noqa: F401  (sets sys.path; mimalloc as the kdbench command runs)

EVAL_MODULES = ("sampling", "decoder", "prompt_cache", "protocol")  # in import order


def status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def load_head_evaluation() -> None:
    """Put git HEAD's evaluation modules in place of the working tree's (before any import of them)."""
    import kdbench.evaluation as package

    for name in EVAL_MODULES:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:kdbench/evaluation/{name}.py"],
                                check=True, capture_output=True, text=True).stdout
        module = types.ModuleType(f"kdbench.evaluation.{name}")
        module.__file__ = f"HEAD:kdbench/evaluation/{name}.py"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        setattr(package, name, module)


def arm(args) -> dict:
    """One arm, in this process: build, reset the peak, evaluate, measure."""
    import torch

    torch.set_num_threads(args.threads)
    if args.code == "head":
        load_head_evaluation()
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdbench.data.loaders import load_minillm_jsonl
    from kdbench.data.records import Example
    from kdbench.device import inference_dtype, release_memory
    from kdbench.evaluation import prompt_cache
    from kdbench.evaluation.protocol import TaskInputs, evaluate_model
    from kdbench.models import load_tokenizer
    from kdbench.suites import EvalSpec, TaskSpec

    rss_start = status_kb("VmRSS")
    dev = torch.device("cpu")
    tok = load_tokenizer(args.tokenizer)
    tok.chat_template = None  # GPT-2 has none: prompts are the Alpaca text plus a newline
    n = args.batch_size * args.batches
    sni = load_minillm_jsonl(Path(args.data_dir) / "sni" / "minillm" / "valid.jsonl", "sni", limit=n)
    if len(sni) < n:
        raise SystemExit(f"{len(sni)} S-NI prompts, {n} needed")
    examples = [Example(id=e.id, prompt=e.meta["alpaca_prompt"], references=e.references, task="sni") for e in sni]
    inputs = TaskInputs.build(tok, examples, args.max_prompt_tokens, args.max_prompt_tokens + args.max_response_tokens)

    def gpt2(layers: int, seed: int):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=args.width, n_layer=layers,
                         n_head=args.width // 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return GPT2LMHeadModel(cfg).eval()

    release_memory()
    rss_before_models = status_kb("VmRSS")
    teacher = gpt2(12, 0).to(inference_dtype(dev))  # a frozen teacher is held as the run holds it
    student = gpt2(6, 1)
    spec = EvalSpec(n_test=n, seeds=(10,), max_new_tokens=args.new_tokens, batch_size=args.batch_size)
    task = TaskSpec("sni", source="sni", max_new_tokens=args.new_tokens)
    key = prompt_cache.key_inputs({"weights": "bench-gpt2", "tokenizer": "smollm2"}, inputs.prompt_ids,
                                  spec.batch_size, dev, inference_dtype(dev))
    stored = prompt_cache.PromptCache(prompt_cache.entry_key(key), key)
    release_memory()  # freed pages the allocator still holds would hide what the evaluation takes
    reset = reset_peak()
    baseline = status_kb("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_model(student, teacher=teacher, tokenizer=tok, inputs=inputs, task=task, spec=spec,
                             device=dev, teacher_prompts=stored)
    seconds = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    widths = [max(len(p) for p in inputs.prompt_ids[a:a + args.batch_size])
              for a in range(0, n, args.batch_size)]
    kv_per_token = 2 * 12 * args.width * torch.tensor([], dtype=inference_dtype(dev)).element_size()
    return {"code": args.code, "batches": args.batches, "prompts": n, "seconds": round(seconds, 1),
            "models_mb": round((baseline - rss_before_models) / 1024, 1),
            "baseline_mb": round(baseline / 1024, 1), "start_mb": round(rss_start / 1024, 1),
            "peak_mb": round(peak / 1024, 1), "eval_peak_mb": round((peak - baseline) / 1024, 1),
            "peak_reset": reset, "mean_prompt_tokens": round(sum(map(len, inputs.prompt_ids)) / n, 1),
            "teacher_kv_whole_task_mb": round(sum(widths) * args.batch_size * kv_per_token / 2**20, 1),
            "teacher_kv_largest_batch_mb": round(max(widths) * args.batch_size * kv_per_token / 2**20, 1),
            "rougeL": round(res.mean("sni", "rougeL"), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per batch (default 4)")
    ap.add_argument("--small", type=int, default=4, help="batches of the small arm (default 4)")
    ap.add_argument("--large", type=int, default=40, help="batches of the large arm (default 40)")
    ap.add_argument("--width", type=int, default=512, help="n_embd of both models, heads of 64 (default 512)")
    ap.add_argument("--max-prompt-tokens", type=int, default=128, help="prompt tokens kept (default 128)")
    ap.add_argument("--max-response-tokens", type=int, default=32, help="reference tokens kept (default 32)")
    ap.add_argument("--new-tokens", type=int, default=4, help="sampled tokens per response (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--data-dir", default=os.environ.get("KDBENCH_DATA_DIR", str(ROOT.parent / "shared" / "data")),
                    help="data root holding sni/minillm/valid.jsonl (default $KDBENCH_DATA_DIR or ../shared/data)")
    ap.add_argument("--compare-head", action="store_true", help="also run both arms with git HEAD's evaluation")
    ap.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # a child: this many batches
    ap.add_argument("--code", default="tree", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)  # a child: the tokenizer folder
    args = ap.parse_args()
    if args.arm is not None:
        args.batches = args.arm
        print("ARM " + json.dumps(arm(args)), flush=True)
        return

    print("machine:", json.dumps(machine()))
    print("command:", " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                                else sys.executable, *sys.argv]))
    from kdbench.models import prepare_teacher

    # the tokenizer folder, converted once in the usual cache (each arm's own cache is empty)
    tokenizer = str(prepare_teacher("embedded:smollm2-135m-instruct"))
    results: dict[tuple[str, int], dict] = {}
    for code in ("tree", "head") if args.compare_head else ("tree",):
        for batches in (args.small, args.large):
            with tempfile.TemporaryDirectory(prefix="bench-eval-memory-") as cache:
                argv = [sys.executable, __file__, "--arm", str(batches), "--code", code, "--tokenizer", tokenizer,
                        *[a for a in sys.argv[1:] if a != "--compare-head"]]
                env = {**os.environ, "KDBENCH_CACHE": cache, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"arm {code}/{batches} failed:\n{out.stderr[-3000:]}")
                line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ARM "))
                results[code, batches] = r = json.loads(line[4:])
                print(f"{code:4s} {batches:3d} batches x {args.batch_size} prompts: evaluation peak "
                      f"{r['eval_peak_mb']:8.1f} MB above {r['baseline_mb']:.1f} MB (models {r['models_mb']:.1f} MB); "
                      f"{r['seconds']:6.1f} s; teacher KV of one batch {r['teacher_kv_largest_batch_mb']} MB, "
                      f"of the task {r['teacher_kv_whole_task_mb']} MB; peak reset: {r['peak_reset']}", flush=True)
    for code in ("tree", "head") if args.compare_head else ("tree",):
        small, large = results[code, args.small], results[code, args.large]
        ratio = large["eval_peak_mb"] / max(small["eval_peak_mb"], 1e-9)
        verdict = "" if code == "head" else ("  (target <= 1.2x: met)" if ratio <= 1.2 else "  (target <= 1.2x: MISSED)")
        print(f"{code}: evaluation peak, {args.large} batches / {args.small} batches = {ratio:.2f}x{verdict}")


if __name__ == "__main__":
    main()
