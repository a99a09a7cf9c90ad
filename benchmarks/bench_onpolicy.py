"""Benchmark: what an on-policy step costs on the micro suite, side by side in one process (issue 28, target 2).

Every kdbench arm is built from the objects a run trains with: ``DistillRun(RunConfig(objective="kl",
sampler=..., ...)).setup(check=False)`` gives the prepared suite, a fresh student (the run's seed),
the batch source (``PackedBatches``, wrapped in ``SampledBatches`` for an on-policy sampler) and the
teacher source; then ``kdbench.engine.trainer.train`` runs ``--warmup`` + ``--steps`` steps with
``spec.steps`` cut to that. The suite is prepared once for all arms and its reference rows (what
evaluation compares against) are not evaluated: neither is part of a training step. Same suite
(micro: the embedded default suite, what ``kdbench run --objective csd`` runs), objective (forward
KL), batch size, examples and order, seed, and step settings (activation checkpointing on, as runs)
in every arm:

  off-cache         ``--sampler off``, the teacher cache (how an off-policy run trains)
  off-live          ``--sampler off --teacher-source live``
  imitkd            ``--sampler imitkd``: every step the student samples its responses (kdbench's
                    decoder: keyed sampling, KV cache, batched) and the live teacher scores them
  gkd               ``--sampler "gkd(lmbda=0.5)"`` (not in the default arms)
  distillm          the ``distillm`` sampler (adaptive schedule + replay buffer) with parameters that
                    make it generate and replay: its defaults with ``p0=1`` and a buffer of one batch,
                    the schedule's budget the arm's steps (printed, with the fresh / replayed / dataset
                    mix of the measured steps; ``--distillm SETTING`` chooses others);
                    "not available" where this kdbench has no such sampler
  generate          the imitkd student after its steps, on the prompts of the batches its measured
                    steps sampled: Hugging Face ``model.generate`` (same max_new_tokens, sampling with
                    the suite's temperature / top-k / top-p, left padding, KV cache, under the same
                    autocast) against kdbench's ``decode`` called bare, and against the generation
                    inside training (``SampledBatches.cost()``) -- target 2's ratio
  trl-gkd           TRL ``GKDTrainer`` with ``lmbda=1`` (always on-policy), ``beta=0`` (forward KL),
                    ``max_new_tokens`` as kdbench's, the same pretokenised examples in the same order
                    (its defaults otherwise, gradient checkpointing on: ``--trl-checkpointing off``
                    turns it off; with it on, GKDTrainer generates with ``use_cache=False``)
  trl-distillation  TRL ``DistillationTrainer`` (``beta=0``, the suite's sampling settings,
                    ``max_completion_length`` as kdbench's max_new_tokens), where the installed TRL has it;
                    prompts handed over as kdbench's token ids (``_tokenize_prompts`` answers from them)

Each arm: s/step, tokens/s (real tokens through the student: prompt + response) and where a step's
time goes: student generation (``SampledBatches.cost()``'s generation seconds; TRL: its
``generate`` call), teacher scoring (the teacher source wrapped in a timing proxy, synchronised on a
GPU; TRL: hooks on the teacher's backbone) and the rest: the student's forward, backward and
optimiser step (with the batch's packing and transfer). Ratios are of s/step, measured here, never
written in: the targets are an ``imitkd`` step ≤ 2× an ``off`` step (against both off arms), a
``distillm`` step ≤ 1.5×, generation inside training ≥ 0.9× the bare ``model.generate`` loop, and
kdbench ``imitkd`` ≥ 1.5× each TRL trainer. TRL is not a kdbench dependency: ``pip install
trl==1.16.0`` for its arms (each says why where it cannot run). Run alone on the machine:

    .venv/bin/python benchmarks/bench_onpolicy.py --steps 8 --warmup 2
    .venv/bin/python benchmarks/bench_onpolicy.py --tiny      # tiny random pair, 2 steps: < 1 min (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from common import machine, report  # noqa: F401  (sets sys.path, the allocator)

import torch  # noqa: E402

ARMS = ("off-cache", "off-live", "imitkd", "gkd", "distillm", "generate", "trl-gkd", "trl-distillation")
DEFAULT_ARMS = tuple(a for a in ARMS if a != "gkd")
KDBENCH_SAMPLERS = {"off-cache": ("off", "cache"), "off-live": ("off", "live"), "imitkd": ("imitkd", "live"),
                    "gkd": ("gkd(lmbda=0.5)", "live")}
TARGETS = {"imitkd": 2.0, "distillm": 1.5, "generate": 0.9, "trl": 1.5}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- the run's objects, shared


_PREPARED: dict = {}  # (suite, device) -> Prepared, for every arm of the process


@contextlib.contextmanager
def shared_suite():
    """``DistillRun.setup`` as a run calls it, less what no training step needs: the suite is
    prepared once for every arm (``recipe.prepare`` memoised by suite and device) and the
    reference rows (evaluation's teacher and undistilled-student rows) are not evaluated."""
    from kdbench import recipe

    real = recipe.prepare

    def prepare_once(suite, device, **kw):
        key = (repr(suite), str(device))
        if key not in _PREPARED:
            _PREPARED[key] = real(suite, device, **kw)
        return _PREPARED[key]

    with mock.patch.object(recipe, "prepare", prepare_once), \
            mock.patch.object(recipe, "ensure_reference_rows", lambda *a, **k: {}):
        yield


def run_config(ctx, sampler: str, teacher_source: str, budget: int | None = None):
    from kdbench.config import RunConfig

    return RunConfig(objective=ctx.objective, sampler=sampler, teacher_source=teacher_source, seed=ctx.seed,
                     steps=budget, device=ctx.device_name, db=str(ctx.tmp / "bench_onpolicy.db"), progress=False,
                     **ctx.pair)


def set_up(ctx, sampler: str, teacher_source: str, budget: int | None = None):
    """The run's objects (``budget``: the run's steps instead of the suite's, as ``--steps``)."""
    from kdbench.recipe import DistillRun

    with shared_suite():
        return DistillRun(run_config(ctx, sampler, teacher_source, budget)).setup(check=False)


class TimedTeacher:
    """A teacher source whose ``hidden`` is timed (synchronised on a GPU); everything else is the
    source's (its head, its kind, a live teacher's model, which the trainer runs packed)."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self.seconds, self.calls, self.counted = 0.0, 0, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def hidden(self, batch):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.source.hidden(batch)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.counted += batch.n_counted
        return out


@dataclass
class Point:
    """Cumulative values after a step."""

    step: int
    tokens: int = 0
    elapsed_s: float = 0.0
    teacher_s: float = 0.0
    generation_s: float = 0.0
    generated_tokens: int = 0
    sampled_steps: int = 0       # steps whose responses the student sampled anew
    replayed_steps: int = 0      # distillm: steps replayed from its buffer
    validation_s: float = 0.0    # distillm: its looks at the validation loss
    counted: int = 0             # positions the loss counts (the responses' tokens)


def window(points: list[Point], warmup: int) -> dict:
    """The measured steps' figures: the last point less the one after the warm-up steps."""
    points = sorted(points, key=lambda p: p.step)
    base = next(p for p in points if p.step == warmup) if warmup else Point(0)
    last = points[-1]
    n = last.step - base.step
    dt = last.elapsed_s - base.elapsed_s
    gen, teach = last.generation_s - base.generation_s, last.teacher_s - base.teacher_s
    val = last.validation_s - base.validation_s
    gen_tok = last.generated_tokens - base.generated_tokens
    return {"steps": n, "s_per_step": dt / n, "tokens_per_s": (last.tokens - base.tokens) / dt,
            "tokens_per_step": (last.tokens - base.tokens) / n, "counted_per_step": (last.counted - base.counted) / n,
            "generation_s_per_step": gen / n,
            "teacher_s_per_step": teach / n, "validation_s_per_step": val / n,
            "student_s_per_step": (dt - gen - teach - val) / n,
            "generated_tokens_per_step": gen_tok / n, "generation_tokens_per_s": gen_tok / gen if gen > 0 else None,
            "sampled_steps": last.sampled_steps - base.sampled_steps,
            "replayed_steps": last.replayed_steps - base.replayed_steps}


def sampling_cost(batches) -> dict:
    """The batch source's cost (``SampledBatches.cost()``: generation seconds and tokens), {} for off."""
    return batches.cost() if callable(getattr(batches, "cost", None)) else {}


def arm_kdbench(ctx, sampler: str, teacher_source: str, *, keep_student: bool = False,
                budget: int | None = None) -> dict:
    from kdbench.engine.trainer import LogHooks, train

    run = set_up(ctx, sampler, teacher_source, budget)
    if ctx.prep is None or budget is None:  # the suite as runs have it, for the arms that build on it
        ctx.prep = run.prep
    device = run.device
    teacher = TimedTeacher(run.teacher, device)
    points: list[Point] = []

    def log(step, point):
        cost = sampling_cost(run.batches)
        points.append(Point(step, point["tokens"], point["elapsed_s"], teacher.seconds,
                            float(cost.get("sampler_generation_s", 0.0)), int(cost.get("sampler_generated_tokens", 0)),
                            int(cost.get("sampler_student_steps", 0)), int(cost.get("sampler_replay_steps", 0)),
                            float(cost.get("sampler_validation_s", 0.0)), teacher.counted))

    spec = dataclasses.replace(run.prep.suite.train, steps=ctx.warmup + ctx.steps, log_every=1)
    result = train(model=run.student, objective=run.objective, batches=run.batches, teacher=teacher, spec=spec,
                   device=device, hooks=LogHooks(log), progress=False)
    out = {"sampler": run.sampler.setting, "teacher": teacher.kind, **window(points, ctx.warmup),
           "activation_checkpointing": result.step_tuning.get("activation_checkpointing")}
    cost = sampling_cost(run.batches)
    if cost:
        out["sampler_cost"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in cost.items()
                               if isinstance(v, (int, float, list))}
    every = getattr(run.batches, "valid_every", None)  # distillm: steps between its looks at the validation loss
    if every and cost.get("sampler_validation_s"):
        looks = len(range(0, ctx.warmup + ctx.steps, every))
        per_look = cost["sampler_validation_s"] / looks
        out["validation_looks"] = {"every": every, "looks": looks, "s_per_look": per_look,
                                   "amortised_s_per_step": per_look / every}
    if keep_student:
        ctx.trained_student = run.student
    return out  # the run's student, optimiser and teacher go with this frame (release() after the arm)


def release() -> None:
    from kdbench.device import release_memory

    gc.collect()
    release_memory()


# ---------------------------------------------------------------------------- distillm


def distillm_setting(arg: str, batch_size: int) -> tuple[str | None, str]:
    """The distillm setting this benchmark runs, and why; (None, reason) where kdbench has none.

    ``auto``: its defaults, with the initial student probability ``p0`` 1 (the defaults' 0 trains on
    the dataset's responses until the validation loss rises, which a few steps never see) and the
    buffer's ``capacity`` one batch (the defaults' 1000 samples are 125 fresh steps: before the buffer
    is full every student step samples anew, so a short run -- or micro's 50 steps -- never replays).
    With the schedule's budget the benchmark's steps (the arm runs as ``--steps N``), its fresh share
    falls from ~1 to 0 over the steps measured, as it does over a whole run: a step is fresh or
    replayed, never the dataset's, until ``p`` would fall -- the on-policy regime at its fullest."""
    from kdbench.engine.samplers import SAMPLERS, get_sampler

    if "distillm" not in SAMPLERS:
        return None, "not available (this kdbench has no distillm sampler)"
    spec = SAMPLERS["distillm"]
    if arg != "auto":
        return get_sampler(arg).setting, f"--distillm {arg}"
    params, changed = dict(spec.defaults), {}
    for key, value in (("p0", 1.0), ("capacity", batch_size)):
        if key in params:
            low, high = spec.ranges.get(key, (value, value))
            params[key] = changed[key] = min(max(value, low), high)
    shown = ",".join(f"{k}={params[k]:g}" for k in sorted(params))
    setting = get_sampler(f"distillm({shown})" if shown else "distillm").setting
    return setting, (f"its defaults {spec.defaults} with {changed} so that the measured steps sample and replay "
                     f"(--distillm SETTING for others)")


def distillm_activity(r: dict) -> dict:
    """What the distillm steps did: in the measured window and over the whole arm (its batch source's cost)."""
    cost = r.get("sampler_cost", {})
    n = r["steps"]
    return {"measured_steps": {"fresh": r["sampled_steps"], "replayed": r["replayed_steps"],
                               "dataset": n - r["sampled_steps"] - r["replayed_steps"]},
            "all_steps": {"fresh": cost.get("sampler_student_steps"), "replayed": cost.get("sampler_replay_steps")},
            "final_p": cost.get("sampler_final_p"), "buffer_size": cost.get("sampler_buffer_size"),
            "raised_at": cost.get("sampler_raised_at")}


# ---------------------------------------------------------------------------- generation: HF generate vs decode


def measured_batches(ctx, prep) -> list:
    """The batches of the measured steps (after the warm-up ones), with the step each was drawn at:
    what an on-policy run of this seed samples responses to."""
    from kdbench.engine.batches import PackedBatches

    src = PackedBatches(prep.train_examples(), prep.suite.train.batch_size, ctx.seed, prep.tokenizer.pad_token_id)
    return [(step, next(src)) for step in range(ctx.warmup + ctx.steps)]


def new_tokens(prep, prompts) -> int:
    """What SampledBatches allows a batch's responses: the suite's max_new_tokens, within its sequence limit."""
    return max(1, min(prep.suite.eval.max_new_tokens, prep.suite.train.max_tokens - max(len(p) for p in prompts)))


def arm_generate(ctx, imitkd: dict | None) -> dict:
    """HF ``model.generate`` and kdbench's ``decode`` (bare) on the imitkd student after its steps,
    on the measured steps' prompts, alternated per batch; against generation inside training."""
    from kdbench.device import autocast_context
    from kdbench.evaluation.sampling import decode

    prep = ctx.prep
    if prep is None:
        raise RuntimeError("no kdbench arm ran before it (the suite is prepared by the first)")
    model = getattr(ctx, "trained_student", None)
    origin = "the imitkd arm's student after its steps"
    if model is None:
        torch.manual_seed(ctx.seed)
        model, origin = prep.new_student(), "a fresh student (the imitkd arm did not run)"
    device, ev, tok = prep.device, prep.suite.eval, prep.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sampling = dict(temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p)
    bf16 = prep.suite.train.bf16_autocast
    totals = {"hf_generate": [0, 0.0], "kdbench_decode": [0, 0.0]}
    limits = []
    model.eval()
    torch.manual_seed(ctx.seed)
    with torch.no_grad(), autocast_context(device, bf16):
        for step, batch in measured_batches(ctx, prep):
            prompts = [e.ids[:e.n_prompt] for e in batch.encoded]
            keys = [f"{i}@step{step + 1}" for i in batch.example_ids]  # SampledBatches' keys: its draws
            n_new = new_tokens(prep, prompts)
            limits.append(n_new)
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):  # left padding
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            measured = step >= ctx.warmup  # the warm-up batches warm both generators up, untimed
            order = ("hf_generate", "kdbench_decode") if step % 2 == 0 else ("kdbench_decode", "hf_generate")
            for arm in order:
                synchronize(device)
                t0 = time.perf_counter()
                if arm == "hf_generate":
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n_new,
                                         eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling)
                    rows = out[:, width:].tolist()
                    n = sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)  # up to end-of-turn
                else:
                    n = sum(len(r) for r in decode(model, prompts, max_new_tokens=n_new, eos_id=eos, pad_id=pad,
                                                   seed=ctx.seed, keys=keys, device=device, **sampling))
                synchronize(device)
                if measured:
                    totals[arm][0] += n
                    totals[arm][1] += time.perf_counter() - t0
    out = {"student": origin, "batches": ctx.steps, "batch_size": prep.suite.train.batch_size,
           "max_new_tokens": sorted(set(limits)), "sampling": sampling}
    for arm, (n, s) in totals.items():
        out[arm] = {"generated_tokens": n, "seconds": round(s, 4), "tokens_per_s": n / s if s > 0 else None}
    if imitkd and imitkd.get("generation_tokens_per_s"):
        out["in_training"] = {"generated_tokens_per_step": imitkd["generated_tokens_per_step"],
                              "tokens_per_s": imitkd["generation_tokens_per_s"]}
    ctx.trained_student = None
    return out


# ---------------------------------------------------------------------------- TRL


class Meter:
    """What a TRL arm's generation and teacher cost, cumulative."""

    def __init__(self):
        self.generation_s = self.teacher_s = 0.0
        self.generated_tokens = self.tokens = 0


@contextlib.contextmanager
def timed_backbone(model, meter: Meter, device: torch.device):
    """Time every forward of ``model``'s backbone (``base_model``: both TRL trainers run the
    teacher's through it), synchronised on a GPU."""
    backbone = model.base_model
    t0 = []

    def before(*_):
        synchronize(device)
        t0.append(time.perf_counter())

    def after(*_):
        synchronize(device)
        meter.teacher_s += time.perf_counter() - t0.pop()

    handles = [backbone.register_forward_pre_hook(before), backbone.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trl_examples(ctx, prep) -> list:
    """The Encoded examples of the steps' batches, in kdbench's order (the batches kdbench's arms train on)."""
    return [e for _, b in measured_batches(ctx, prep) for e in b.encoded]


def trl_clock(meter: Meter, points: list[Point], device: torch.device):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = None

        def on_step_begin(self, args, state, control, **kw):
            if self.t0 is None:
                synchronize(device)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            points.append(Point(state.global_step, meter.tokens, time.perf_counter() - self.t0, meter.teacher_s,
                                meter.generation_s, meter.generated_tokens, state.global_step,
                                counted=meter.generated_tokens))  # every step on-policy: the loss counts the completions

    return Clock()


def trl_common(ctx, prep, out_dir: str) -> dict:
    from kdbench.device import native_bf16

    spec = prep.suite.train
    return dict(output_dir=out_dir, per_device_train_batch_size=spec.batch_size, max_steps=ctx.warmup + ctx.steps,
                learning_rate=spec.lr, bf16=native_bf16(prep.device) and spec.bf16_autocast,
                use_cpu=prep.device.type == "cpu", logging_steps=10_000, save_strategy="no", report_to=[],
                dataloader_drop_last=True, seed=ctx.seed, data_seed=ctx.seed,
                gradient_checkpointing=ctx.trl_checkpointing)


def arm_trl_gkd(ctx) -> dict:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    prep = ctx.prep
    device, tok, ev = prep.device, prep.tokenizer, prep.suite.eval
    examples = trl_examples(ctx, prep)
    n_new = new_tokens(prep, [e.ids[:e.n_prompt] for e in examples])
    # trl 1.16's DataCollatorForChatML takes tokenised rows with a "prompt" and a completion_mask (the
    # prompt boundary): no re-tokenising; it left-pads the prompts it generates from
    rows = [{"prompt": tok.decode(e.ids[:e.n_prompt]), "input_ids": list(e.ids), "attention_mask": [1] * len(e.ids),
             "completion_mask": [0] * e.n_prompt + [1] * (len(e.ids) - e.n_prompt)} for e in examples]
    meter, points = Meter(), []

    class TimedGKD(GKDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
            synchronize(device)
            t0 = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            synchronize(device)
            meter.generation_s += time.perf_counter() - t0
            width = inputs["prompts"].shape[1]
            meter.generated_tokens += int(mask[:, width:].sum())
            meter.tokens += int(mask.sum())
            return ids, mask, labels

    cfg = GKDConfig(**trl_common(ctx, prep, tempfile.mkdtemp(prefix="kdbench-trl-gkd-", dir=ctx.tmp)),
                    lmbda=1.0, beta=0.0, temperature=ev.temperature, max_new_tokens=n_new,
                    remove_unused_columns=False, max_length=prep.suite.train.max_tokens,
                    train_sampling_strategy="sequential")
    torch.manual_seed(ctx.seed)
    teacher = prep.teacher()
    trainer = TimedGKD(model=prep.new_student(), teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=tok, callbacks=[trl_clock(meter, points, device)])
    with timed_backbone(teacher, meter, device):
        trainer.train()
    out = {"trl": _trl_version(), "lmbda": 1.0, "beta": 0.0, "max_new_tokens": n_new, "bf16": cfg.bf16,
           "gradient_checkpointing": cfg.gradient_checkpointing,
           "generation": "model.generate, top_k=0 top_p=1 (GKDTrainer's), temperature "
                         f"{ev.temperature:g}, use_cache={trainer.generation_config.use_cache}",
           **window(points, ctx.warmup)}
    return out


def arm_trl_distillation(ctx) -> dict:
    import trl
    from datasets import Dataset

    if not hasattr(trl, "DistillationTrainer"):
        return {"skipped": f"trl {_trl_version()} has no DistillationTrainer"}
    DistillationConfig, DistillationTrainer = trl.DistillationConfig, trl.DistillationTrainer
    prep = ctx.prep
    device, tok, ev = prep.device, prep.tokenizer, prep.suite.eval
    examples = trl_examples(ctx, prep)
    n_new = new_tokens(prep, [e.ids[:e.n_prompt] for e in examples])
    by_text = {}
    for e in examples:
        by_text[tok.decode(e.ids[:e.n_prompt])] = list(e.ids[:e.n_prompt])
    rows = [{"prompt": tok.decode(e.ids[:e.n_prompt])} for e in examples]
    meter, points = Meter(), []

    class TimedDistillation(DistillationTrainer):
        def _tokenize_prompts(self, prompts):  # kdbench's prompt ids, not a re-tokenisation of their text
            return [by_text[p] for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            synchronize(device)
            t0 = time.perf_counter()
            completions = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            synchronize(device)
            meter.generation_s += time.perf_counter() - t0
            generated = sum(len(c) for c in completions)
            meter.generated_tokens += generated
            meter.tokens += generated + sum(len(p) for p in prompt_ids)
            return completions

    cfg = DistillationConfig(**trl_common(ctx, prep, tempfile.mkdtemp(prefix="kdbench-trl-distill-", dir=ctx.tmp)),
                             beta=0.0, temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p,
                             max_completion_length=n_new, shuffle_dataset=False)
    torch.manual_seed(ctx.seed)
    teacher = prep.teacher()
    trainer = TimedDistillation(model=prep.new_student(), teacher_model=teacher, args=cfg,
                                train_dataset=Dataset.from_list(rows), processing_class=tok,
                                callbacks=[trl_clock(meter, points, device)])
    with timed_backbone(teacher, meter, device):
        trainer.train()
    out = {"trl": _trl_version(), "beta": 0.0, "max_completion_length": n_new, "bf16": cfg.bf16,
           "gradient_checkpointing": cfg.gradient_checkpointing,
           "generation": f"model.generate, temperature {ev.temperature:g} top_k {ev.top_k} top_p {ev.top_p:g}",
           **window(points, ctx.warmup)}
    return out


def _trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "?")


# ---------------------------------------------------------------------------- tiny mode


def tiny_pair(root: Path) -> dict:
    """A tiny random teacher (2 blocks) and student (1 block), d 64, with SmolLM2's tokenizer and
    vocabulary: the micro suite's data, batches and sampling in seconds (``--tiny``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdbench.models import load_tokenizer, prepare_teacher

    tok = load_tokenizer(prepare_teacher("embedded:smollm2-135m-instruct"))
    paths = {}
    for name, layers, seed in (("teacher", 2, 0), ("student", 1, 1)):
        path = root / name
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = str(path)
    return {"teacher": paths["teacher"], "teacher_finetuned": True, "student": paths["student"]}


# ---------------------------------------------------------------------------- the table and the verdicts


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, spec=".3f", missing="-"):
    return missing if x is None else format(x, spec)


def table(results: dict) -> list[str]:
    """The step arms as a markdown table (s/step, tokens/s, ratios to the off steps, where the time
    goes), then the generation arm's and the arms that did not run."""
    arms = {k: v for k, v in results["arms"].items() if isinstance(v, dict) and "s_per_step" in v}
    base = {b: arms.get(b, {}).get("s_per_step") for b in ("off-cache", "off-live")}
    head = ("arm", "s/step", "tok/s", "tok/step", "counted/step", "x off-cache", "x off-live", "generation s/step",
            "teacher s/step", "validation s/step", "student fwd+bwd+opt s/step", "gen tok/step", "gen tok/s",
            "fresh/replayed/measured steps")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in arms.items():
        lines.append("| " + " | ".join([
            name, fmt(r["s_per_step"]), fmt(r["tokens_per_s"], ".1f"), fmt(r["tokens_per_step"], ".1f"),
            fmt(r.get("counted_per_step"), ".1f"), fmt(ratio(r["s_per_step"], base["off-cache"]), ".2f"), fmt(ratio(r["s_per_step"], base["off-live"]), ".2f"),
            fmt(r["generation_s_per_step"]), fmt(r["teacher_s_per_step"]), fmt(r.get("validation_s_per_step")),
            fmt(r["student_s_per_step"]), fmt(r["generated_tokens_per_step"], ".1f"),
            fmt(r["generation_tokens_per_s"], ".1f"),
            f"{r['sampled_steps']}/{r.get('replayed_steps', 0)}/{r['steps']}"]) + " |")
    gen = results["arms"].get("generate")
    if isinstance(gen, dict) and "hf_generate" in gen:
        lines += ["", f"generation on the measured steps' prompts ({gen['student']}; batch {gen['batch_size']}, "
                      f"max_new_tokens {gen['max_new_tokens']}, {gen['sampling']}):",
                  "| generator | generated tokens | seconds | tok/s |", "|---|---|---|---|"]
        for key, label in (("hf_generate", "HF model.generate (left padding, KV cache)"),
                           ("kdbench_decode", "kdbench decode, bare")):
            g = gen[key]
            lines.append(f"| {label} | {g['generated_tokens']} | {g['seconds']:.3f} | {fmt(g['tokens_per_s'], '.1f')} |")
        inside = gen.get("in_training")
        if inside:
            lines.append(f"| inside training (SampledBatches, the imitkd arm) | {inside['generated_tokens_per_step']:.1f}"
                         f" per step | - | {fmt(inside['tokens_per_s'], '.1f')} |")
    for name, r in results["arms"].items():
        if name not in arms and not (name == "generate" and isinstance(r, dict)):
            lines.append(f"{name}: {r if isinstance(r, str) else r.get('skipped', r)}")
    for name in ("trl-gkd", "trl-distillation"):
        r = arms.get(name)
        if r:
            shown = {k: r[k] for k in ("trl", "lmbda", "beta", "max_new_tokens", "max_completion_length", "bf16",
                                       "gradient_checkpointing", "generation") if k in r}
            lines.append(f"{name}: {shown}")
    dm = results["arms"].get("distillm")
    if isinstance(dm, dict) and "activity" in dm:
        lines.append(f"distillm: {dm['sampler']}, schedule budget {dm['schedule_budget']} steps; did {dm['activity']}")
        looks = dm.get("validation_looks")
        if looks:
            lines.append(f"distillm's validation-loss look: {looks['s_per_look']:.3f} s every {looks['every']} steps "
                         f"= {looks['amortised_s_per_step']:.4f} s/step amortised (in the measured steps: "
                         f"{dm['validation_s_per_step']:.4f} s/step)")
    return lines


def verdicts(results: dict) -> list[str]:
    """Each target as the ratio measured here (None where an arm is missing)."""
    arms = results["arms"]

    def s(name):
        r = arms.get(name)
        return r.get("s_per_step") if isinstance(r, dict) else None

    def verdict(value, bound, le):
        if value is None:
            return "not measured"
        return "met" if (value <= bound if le else value >= bound) else "NOT met"

    out, v = [], {}
    for arm, bound in (("imitkd", TARGETS["imitkd"]), ("distillm", TARGETS["distillm"])):
        for off in ("off-cache", "off-live"):
            r = ratio(s(arm), s(off))
            v[f"{arm} / {off}"] = r
            out.append(f"target 1: {arm} step / {off} step = {fmt(r, '.2f')}x (<= {bound:g}x: {verdict(r, bound, True)})")
    gen = arms.get("generate") if isinstance(arms.get("generate"), dict) else {}
    hf = (gen.get("hf_generate") or {}).get("tokens_per_s")
    inside = (gen.get("in_training") or {}).get("tokens_per_s")
    bare = (gen.get("kdbench_decode") or {}).get("tokens_per_s")
    for label, value in (("in training", inside), ("bare decode", bare)):
        r = ratio(value, hf)
        v[f"generation {label} / hf_generate"] = r
        out.append(f"target 2: generation {label} {fmt(value, '.1f')} tok/s / HF generate {fmt(hf, '.1f')} tok/s = "
                   f"{fmt(r, '.2f')}x" + (f" (>= {TARGETS['generate']:g}x: {verdict(r, TARGETS['generate'], False)})"
                                          if label == "in training" else " (for reference)"))
    for trl_arm in ("trl-gkd", "trl-distillation"):
        r = ratio(s(trl_arm), s("imitkd"))  # kdbench's speed-up: TRL's s/step over kdbench's
        v[f"imitkd speed-up over {trl_arm}"] = r
        out.append(f"target 3: {trl_arm} s/step / imitkd s/step = {fmt(r, '.2f')}x "
                   f"(>= {TARGETS['trl']:g}x: {verdict(r, TARGETS['trl'], False)})")
    results["ratios"] = {k: None if x is None else round(x, 3) for k, x in v.items()}
    return out


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 8; --tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; --tiny: 1)")
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS, metavar="ARM",
                    help=f"arms to run, in this order (default: {' '.join(DEFAULT_ARMS)}; also: gkd)")
    ap.add_argument("--objective", default="kl", help="the objective of every arm (default kl: forward KL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distillm", default="auto", metavar="SETTING",
                    help="the distillm arm's sampler setting (default auto: its defaults with p0=1 and a buffer "
                         "of one batch, so that the measured steps sample and replay; its schedule's budget is "
                         "always the arm's warm-up + measured steps)")
    ap.add_argument("--trl-checkpointing", choices=("on", "off"), default="on",
                    help="TRL's gradient checkpointing (default on: its default and kdbench's)")
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random teacher/student pair on the micro suite's data, few steps: < 1 min")
    ap.add_argument("--out", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    if steps < 1 or warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")

    from kdbench.device import default_threads

    default_threads()
    tmp = Path(tempfile.mkdtemp(prefix="kdbench-bench-onpolicy-"))  # store, TRL's output, --tiny's pair and cache
    try:
        run_arms(args, steps, warmup, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_arms(args, steps: int, warmup: int, tmp: Path) -> None:
    """Every arm of ``args.arms`` in order, then the table, the targets and the JSON report."""
    from kdbench.engine.samplers import SAMPLERS

    pair = {}
    if args.tiny:  # the tiny pair's teacher cache and digests go to a cache of its own, not the user's
        pair = tiny_pair(tmp / "models")
        os.environ["KDBENCH_CACHE"] = str(tmp / "cache")
    ctx = argparse.Namespace(steps=steps, warmup=warmup, seed=args.seed, objective=args.objective, tmp=tmp,
                             device_name=args.device, trl_checkpointing=args.trl_checkpointing == "on", pair=pair,
                             prep=None, trained_student=None)
    results = {"suite": "micro", "objective": args.objective, "steps": steps, "warmup": warmup, "seed": args.seed,
               "tiny": args.tiny, "samplers_available": sorted(SAMPLERS), "arms": {}}

    def say(msg):
        print(f"[bench_onpolicy] {msg}", flush=True)

    for arm in args.arms:
        t0 = time.perf_counter()
        try:
            if arm in KDBENCH_SAMPLERS:
                sampler, source = KDBENCH_SAMPLERS[arm]
                r = arm_kdbench(ctx, sampler, source, keep_student=arm == "imitkd" and "generate" in args.arms)
                if ctx.prep is not None and "setup" not in results:
                    prep = ctx.prep
                    results["setup"] = {"device": str(prep.device), "teacher": str(prep.teacher_path),
                                        "batch_size": prep.suite.train.batch_size,
                                        "max_new_tokens": prep.suite.eval.max_new_tokens,
                                        "max_tokens": prep.suite.train.max_tokens,
                                        "sampling": {"temperature": prep.suite.eval.temperature,
                                                     "top_k": prep.suite.eval.top_k, "top_p": prep.suite.eval.top_p},
                                        "bf16_autocast": prep.suite.train.bf16_autocast}
            elif arm == "distillm":
                batch_size = ctx.prep.suite.train.batch_size if ctx.prep is not None else 8
                setting, why = distillm_setting(args.distillm, batch_size)
                say(f"distillm: {setting} ({why}); the schedule's budget: {ctx.warmup + ctx.steps} steps"
                    if setting else f"distillm: {why}")
                if setting is None:
                    results["arms"][arm] = why
                    continue
                r = arm_kdbench(ctx, setting, "live", budget=ctx.warmup + ctx.steps)
                r["setting_chosen"] = why
                r["schedule_budget"] = ctx.warmup + ctx.steps
                r["activity"] = distillm_activity(r)
                say(f"distillm did: {r['activity']}")
            elif arm == "generate":
                r = arm_generate(ctx, results["arms"].get("imitkd") if isinstance(results["arms"].get("imitkd"),
                                                                                   dict) else None)
            else:
                try:
                    import trl  # noqa: F401
                except ImportError:
                    results["arms"][arm] = "not installed (pip install trl==1.16.0)"
                    say(f"{arm}: TRL is not installed (pip install trl==1.16.0)")
                    continue
                if ctx.prep is None:
                    raise RuntimeError("no kdbench arm ran before it (the suite is prepared by the first)")
                r = arm_trl_gkd(ctx) if arm == "trl-gkd" else arm_trl_distillation(ctx)
        except Exception as exc:  # noqa: BLE001 - an arm that fails is reported; the others still run
            results["arms"][arm] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            say(f"{arm} failed: {type(exc).__name__}: {exc}")
            continue
        finally:
            release()  # the arm's models, optimiser state and activations, before the next arm
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results["arms"][arm] = r
        if "s_per_step" in r:
            say(f"{arm}: {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:.1f} tok/s (generation "
                f"{r['generation_s_per_step']:.3f}, teacher {r['teacher_s_per_step']:.3f}, student "
                f"{r['student_s_per_step']:.3f} s/step)")
        elif arm == "generate":
            say(f"generate: HF {fmt(r['hf_generate']['tokens_per_s'], '.1f')} tok/s, kdbench decode "
                f"{fmt(r['kdbench_decode']['tokens_per_s'], '.1f')} tok/s, in training "
                f"{fmt((r.get('in_training') or {}).get('tokens_per_s'), '.1f')} tok/s")

    lines = table(results)
    checks = verdicts(results)
    print("\n".join(["", f"on-policy cost, suite micro{' (--tiny pair)' if args.tiny else ''}, objective "
                     f"{args.objective}, {steps} measured steps after {warmup} warm-up, seed {args.seed}:", *lines,
                     "", *checks, ""]), flush=True)
    results["verdicts"] = checks
    command = "python benchmarks/bench_onpolicy.py " + " ".join(sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "on-policy cost (micro)", "machine": machine(),
                                              "results": results, "command": command}, indent=2, default=str))
    report("on-policy cost (micro)", results, command)


if __name__ == "__main__":
    main()
