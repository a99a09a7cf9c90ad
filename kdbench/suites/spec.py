"""The shapes of a suite spec. Every default is documented where it is defined.

A suite fixes everything that must be equal for objectives to compare fairly: the model pair,
the data, the training budget, the checkpoint rule and the evaluation protocol. Only the loss
differs between runs on one suite version.

Versioning: ``SuiteSpec.version`` is stored with every result (``runs.suite_version``).
Changing anything that changes what a number means -- a prompt format, a split, a task, a
metric, a decoding setting, a budget -- must bump it; reference rows (teacher, undistilled
student) are then recomputed. Runs that override part of a suite from the command line are
filed under ``version + "+" + overrides`` (e.g. ``1+steps=3``, ``1+pair=gpt2-xl-to-medium``),
never beside standard results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Headline metric per task kind: what the leaderboard ranks by and what checkpoint selection
# maximises on the validation set.
HEADLINE = {"open": "rougeL", "exact": "accuracy", "translation": "bleu"}


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 200                 # optimiser steps (the budget; same for every objective)
    batch_size: int = 8              # sequences per step
    max_prompt_tokens: int = 128     # prompt tokens kept (left-truncated)
    max_tokens: int = 192            # prompt + response tokens
    lr: float = 1e-4                 # AdamW peak learning rate (the paper's value)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10           # linear warm-up, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    grad_clip: float = 1.0           # max global grad norm (rescues a bad step, never the default path)
    bf16_autocast: bool = True       # torch.autocast(bfloat16) on CPU when the CPU supports it
    log_every: int = 10              # training-curve points every N steps
    epochs: float | None = None      # budget in epochs instead of steps: once the training set is
    #                                  known, steps = ceil(epochs * len(train) / batch_size)
    valid_every_epochs: float | None = None  # with `epochs`: validate every N epochs (sets
    #                                  EvalSpec.valid_every in steps once the data is known)

    def steps_for(self, n_train: int) -> int:
        """The budget in steps (``epochs`` converted with the training-set size)."""
        if self.epochs:
            return max(1, math.ceil(self.epochs * n_train / self.batch_size))
        return self.steps


@dataclass(frozen=True)
class EvalSpec:
    n_test: int = 100                # test prompts evaluated per task (the first N by stable id order)
    seeds: tuple[int, ...] = (10, 20, 30)  # sampling seeds (the paper uses 10..50)
    temperature: float = 1.0         # the paper's protocol: pure sampling
    top_p: float = 1.0
    top_k: int = 0                   # 0 = no top-k truncation
    max_new_tokens: int = 48         # responses are cut at end-of-turn or here
    batch_size: int = 50             # prompts decoded together: memory and speed only (samples are keyed per prompt)
    valid_every: int = 0             # validation score every N steps for checkpoint choice (0: off, last step)
    n_valid: int = 40                # validation prompts for checkpoint selection


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: where its test set comes from and how it is scored.

    kind "open": ROUGE-L headline (+ diversity, fidelity); "exact": accuracy headline, the
    answer compared through the extraction function named by ``answer`` (kdbench/evaluation/scoring.py);
    "translation": corpus BLEU headline and chrF (sacrebleu) + ROUGE-L.
    Decoding: ``sample`` = the EvalSpec protocol over its seeds (metrics per seed); ``greedy``
    = one deterministic decode (metrics with seed NULL; the headline of an exact task when
    set, as GSM8K in the paper). Both may be on: the greedy headline plus sampled diversity.
    """

    name: str                        # metrics rows are keyed by this
    source: str                      # data-source key the suite's data builder fills (kdbench/data/sources.py)
    kind: str = "open"               # "open" | "exact" | "translation"
    answer: str | None = None        # exact tasks: "final_number" (GSM8K) or "short_answer" (micro-task)
    sample: bool = True              # sampled protocol over EvalSpec.seeds
    greedy: bool = False             # one greedy decode (headline of exact tasks)
    n_test: int | None = None        # cap on this task's test set (None: EvalSpec.n_test); EvalSpec.n_test caps all
    seeds: tuple[int, ...] | None = None   # None: EvalSpec.seeds
    max_new_tokens: int | None = None      # None: EvalSpec.max_new_tokens

    @property
    def headline(self) -> str:
        return HEADLINE[self.kind]

    @property
    def decoding(self) -> str:
        return "+".join(d for d, on in (("greedy", self.greedy), ("sample", self.sample)) if on)


@dataclass(frozen=True)
class PairSpec:
    """A teacher/student pair. ``teacher``: "embedded:smollm2-135m-instruct", a hub id or a
    local folder. ``student``: {"kind": "layer_subset", "keep_every": N} (blocks taken from
    the base teacher, models.build_student) or {"kind": "pretrained", "name": hub id or path}."""

    teacher: str
    student: dict
    teacher_finetuned: bool = False  # the teacher is already fine-tuned for the suite: skip its fine-tuning
    note: str = ""                   # where the pair comes from (shown by `kdbench list`)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    version: str
    description: str
    pairs: dict                      # pair name -> PairSpec
    default_pair: str                # the pair standard results use
    data: dict                       # {"loader": data builder name (kdbench/data/sources.py), ...its settings}
    tasks: tuple[TaskSpec, ...]      # evaluation tasks; tasks[0] is the validation task (its headline selects checkpoints)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    finetune: TrainSpec | None = None  # teacher fine-tuning on the training split before distillation (cached)
    pair: str | None = None          # the selected pair (None: default_pair); set by command-line overrides
    licences: str = ""               # data and model licences (shown in docs/suites.md and `kdbench list`)
    system_prompt: str | None = None  # the chat template's system turn: None keeps the template's default
    #                                   (SmolLM2's is 20 tokens per example), "" gives an empty one

    @property
    def pair_name(self) -> str:
        return self.pair or self.default_pair

    @property
    def selected(self) -> PairSpec:
        return self.pairs[self.pair_name]

    @property
    def teacher(self) -> str:
        return self.selected.teacher

    @property
    def student(self) -> dict:
        return self.selected.student

    @property
    def valid_task(self) -> TaskSpec:
        return self.tasks[0]

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(pair=self.pair_name, teacher=self.teacher, student=self.student)
        return d
