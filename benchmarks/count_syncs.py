#!/usr/bin/env python
"""Host synchronisations per training step: how often ``train()`` waits for the device.

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``, ``.tolist()`` of a device
tensor (and every ``if tensor:``) stops the host until the device has caught up, so the next
kernels are not queued while the current ones run. This script counts them per step of the
real ``train()`` (kdbench/engine/trainer.py) on tiny random models built from their configs
(no files, no hub):

* on CUDA with ``torch.cuda.set_sync_debug_mode("warn")``: torch's own count of synchronising
  calls, one warning each;
* on the CPU (where nothing waits) by counting those conversions of tensors made while a step
  runs, attributed to the first kdbench / transformers / torch frame that made them. A CPU count
  over-counts what stays on the host on a GPU too (a CPU index tensor read back is no sync there),
  so read its breakdown, not only its total.

    python benchmarks/count_syncs.py                    # cuda if available, else cpu
    python benchmarks/count_syncs.py --device cpu --steps 4 --objectives kl csd ce --packed-attention dense

Prints one line per (model, objective): syncs per step, and the call sites with their counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import os
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

#: Tensor conversions that wait for the device when the tensor lives on one.
CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
#: Functions whose conversions read tensors that stay on the host on a GPU too (the packed row's
#: sequence bounds, made on the CPU: kdbench/modeling.py): counted apart, not as syncs.
HOST_ONLY = ("per_sequence_attention", "sequence_bounds")


def _site() -> str:
    """``file:line`` of the innermost frame in kdbench, transformers or torch that is not this file
    (prefixed ``host:`` for a function of :data:`HOST_ONLY`)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if f == __file__:
            continue
        for root in ("kdbench", "transformers", "torch"):
            key = f"/{root}/"
            if key in f:
                where = f"{root}/{f.split(key, 1)[1]}:{frame.lineno}"
                return f"host:{where}" if frame.name in HOST_ONLY else where
    return "?"


@contextlib.contextmanager
def counting(device: torch.device):
    """Yields a Counter of call sites that synchronised (CUDA: torch's sync debug mode; CPU:
    the tensor conversions of :data:`CONVERSIONS`, counted while ``counter.on`` is true)."""
    counter: collections.Counter = collections.Counter()
    counter.on = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                counter[f"{Path(w.filename).name}:{w.lineno}"] += 1
        return
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if counter.on:
                counter[_site()] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def tiny_models(kind: str, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
        teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **cfg))
        student = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **cfg))
    else:
        cfg = dict(vocab_size=512, n_embd=64, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, bos_token_id=511, eos_token_id=511)
        teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, **cfg))
        student = GPT2LMHeadModel(GPT2Config(n_layer=1, **cfg))
    return teacher.to(device).eval().requires_grad_(False), student.to(device)


def examples(n: int, vocab: int):
    from kdbench.data.batching import Encoded

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, r = 5 + 3 * (i % 4), 6 + 5 * (i % 3)
        out.append((f"ex:{i}", Encoded(torch.randint(0, vocab, (p + r,), generator=g).tolist(), p)))
    return out


def count(kind: str, objective: str, device: torch.device, steps: int, tuning=None) -> tuple[float, dict]:
    """(syncs per step, {call site: count over the steps}) of ``steps`` steps of ``train()`` (with
    ``tuning``, a StepTuning; None: the device's). ``host:`` sites are listed, not counted."""
    from kdbench.engine.batches import PackedBatches
    from kdbench.engine.teacher import LiveTeacher
    from kdbench.engine.trainer import TrainHooks, train
    from kdbench.registry import get_objective
    from kdbench.suites import TrainSpec

    teacher, student = tiny_models(kind, device)
    obj = get_objective(objective)
    spec = TrainSpec(steps=steps + 1, batch_size=4, max_prompt_tokens=32, max_tokens=64, warmup_steps=1,
                     log_every=1, bf16_autocast=False)
    kwargs = {} if tuning is None else {"tuning": tuning}
    with counting(device) as counter:
        class Hooks(TrainHooks):
            def on_step(self, state, optimizer):
                counter.on = True  # the first step (warm-up, lazy initialisations) is not counted

        train(model=copy.deepcopy(student).train(), objective=obj, batches=PackedBatches(examples(24, 512), 4, 0),
              teacher=LiveTeacher(teacher) if obj.needs_teacher else None, spec=spec, device=device,
              hooks=Hooks(), progress=False, **kwargs)
        counter.on = False
    if device.type == "cuda":  # the sync debug mode counted the first step too
        steps += 1
    return sum(v for k, v in counter.items() if not k.startswith("host:")) / steps, dict(counter.most_common())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3, help="counted steps (after one uncounted step)")
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    ap.add_argument("--objectives", nargs="+", default=["kl", "csd", "ce"])
    ap.add_argument("--packed-attention", nargs="+", default=["device", "dense", "per_sequence"],
                    help="'device': the device's tuning as it is; a mode: the device's tuning with that packed attention")
    args = ap.parse_args(argv)
    from kdbench.engine.tuning import step_tuning

    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {args.steps} counted steps")
    for mode in args.packed_attention:
        tuning = None if mode == "device" else dataclasses.replace(step_tuning(device), packed_attention=mode)
        for kind in args.models:
            for name in args.objectives:
                per_step, sites = count(kind, name, device, args.steps, tuning)
                shown = ", ".join(f"{k} x{v}" for k, v in sites.items())
                print(f"{mode:12s} {kind:6s} {name:5s} {per_step:5.2f} syncs/step   {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
