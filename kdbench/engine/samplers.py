"""Where a training batch's responses come from: the sampler, an axis beside the objective.

The objective says how the student is pulled towards the teacher on a sequence; the sampler says
whose sequence it is. ``off`` trains on the dataset's responses (what every run did before
samplers existed, and still the default); the on-policy samplers train on responses the student
being trained samples to the batch's prompts, which the teacher then scores live::

    kdbench run --objective csd --sampler imitkd
    kdbench run --objective jsd --sampler "gkd(lmbda=0.5)"

=========  ==========================================================  ==========================
sampler    a step's responses                                          after
=========  ==========================================================  ==========================
off        the dataset's (the teacher cache serves them)               --
seqkd      the teacher's, generated once per suite version and         SeqKD (Kim & Rush, 2016)
           teacher group and cached (kdbench/engine/seqkd.py); then
           trained on off-policy, the teacher cache serving them
imitkd     sampled from the current student, every step                ImitKD (Lin et al., 2020)
gkd        the student's with probability ``lmbda`` per step, else     GKD (Agarwal et al., 2024)
           the dataset's
distillm   the dataset's until the student's validation loss rises,    DistiLLM (Ko et al., 2024)
           then more and more the student's, fresh or replayed from a
           buffer (kdbench/engine/replay.py)
=========  ==========================================================  ==========================

Rules (tests/test_samplers.py checks each):

* The batch's examples are the dataset's, in its order (:class:`~kdbench.engine.batches.PackedBatches`,
  whose cursor moves one batch per step whoever answers), so ``gkd(lmbda=0)`` *is* ``off`` and
  ``gkd(lmbda=1)`` *is* ``imitkd``, bit for bit.
* Every random decision is keyed, never drawn from a stream: the per-step coin of ``gkd`` and
  ``distillm`` and ``distillm``'s replay draws by (run seed, step), each sampled token by (run
  seed, ``<example id>@step<n>``, position) through the evaluation's decoder
  (kdbench/evaluation/sampling.py ``decode``: inverse CDF of keyed uniforms). So the sampler's
  state is its step count (and ``distillm``'s probability, last loss and buffer), all in the
  train state: a resumed run samples what the uninterrupted one did, and no rank or clock
  enters a decision.
* The student samples as it is evaluated: in eval mode (no dropout; its KV cache on), under the
  suite's precision, with the suite's sampling settings (temperature, top-k, top-p) and up to the
  suite's ``max_new_tokens``, no further than the suite's sequence limit allows. A response that
  ends on the end-of-turn token keeps it (it is trained on); one that reaches the limit is trained
  on as cut, and counted (``describe()``, the run's ``config["sampler"]``).
* Sampled sequences get new ids (``<example id>@step<n>``): the teacher cache, which holds the
  teacher's states of the dataset's sequences, never serves them (it refuses an id it does not
  hold); an on-policy run's teacher is live.
* ``seqkd`` is off-policy: its sequences (``<example id>@seqkd``) are fixed before training, so
  the teacher cache is built over them and serves them as it serves the dataset's; a ``seqkd``
  run *is* an ``off`` run on the materialised set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kdbench.data.batching import Batch, Encoded, pack
from kdbench.device import autocast_context
from kdbench.engine.replay import AdaptiveSchedule, KeptSample, ReplayBuffer, keyed_uniform, validation_loss
from kdbench.errors import UserError, did_you_mean
from kdbench.evaluation.sampling import decode
from kdbench.objective_spec import ObjectiveError, parse_setting


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as ``kdbench list`` shows it: its parameters with their defaults and ranges."""

    name: str
    summary: str
    paper: str
    defaults: dict = field(default_factory=dict)       # parameter -> default
    ranges: dict = field(default_factory=dict)         # parameter -> (low, high), both included
    whole: frozenset = frozenset()                     # parameters that must be whole numbers


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("off", "the dataset's responses (the default; the teacher cache serves them)", "-"),
    SamplerSpec("seqkd", "the teacher's responses to the training prompts, generated once per suite version and "
                "teacher group (greedy=1: greedy, 0: sampled as evaluation samples), then trained on off-policy",
                "Kim & Rush 2016, Sequence-Level Knowledge Distillation (SeqKD)",
                defaults={"greedy": 1}, ranges={"greedy": (0, 1)}, whole=frozenset({"greedy"})),
    SamplerSpec("imitkd", "every step's responses sampled from the current student, scored by the live teacher",
                "Lin et al. 2020, Autoregressive Knowledge Distillation through Imitation Learning (ImitKD)"),
    SamplerSpec("gkd", "with probability lmbda per step the student's samples, else the dataset's responses",
                "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
                defaults={"lmbda": 0.5}, ranges={"lmbda": (0.0, 1.0)}),
    SamplerSpec("distillm", "the dataset's responses until the student's validation loss rises by eps, then with "
                "probability p (p0, raised by delta each time) the student's, fresh or replayed from a buffer "
                "of capacity samples",
                "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for Large Language Models",
                defaults={"p0": 0.0, "eps": 0.1, "delta": 0.1, "capacity": 1000},
                ranges={"p0": (0.0, 1.0), "eps": (0.0, 1e9), "delta": (0.0, 1.0), "capacity": (1, 10 ** 7)},
                whole=frozenset({"capacity"})),
)}

#: Samplers whose responses are the student's (sampled during training, scored by a live teacher).
ON_POLICY = ("imitkd", "gkd", "distillm")


def format_samplers() -> str:
    """The samplers as ``kdbench list`` shows them: name with its parameters' defaults and ranges,
    what a step's responses are, the paper."""
    lines = []
    for spec in SAMPLERS.values():
        params = ", ".join(f"{k}={v:g} in [{spec.ranges[k][0]:g}, {spec.ranges[k][1]:g}]"
                           for k, v in spec.defaults.items())
        name = spec.name + (f"({params})" if params else "")
        text = spec.summary + (f" [{spec.paper}]" if spec.paper != "-" else "")
        # a long parameter list gets a line of its own, so the summaries stay in one column
        lines.append(f"  {name:<30} {text}" if len(name) <= 30 else f"  {name}\n  {'':<30} {text}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Sampler:
    """A sampler with its parameters resolved (:func:`get_sampler`)."""

    name: str
    params: dict

    @property
    def setting(self) -> str:
        """Canonical ``name(key=value,...)``: what the run records and the leaderboard row names."""
        shown = ",".join(f"{k}={self.params[k]:g}" for k in sorted(self.params))
        return f"{self.name}({shown})" if shown else self.name

    @property
    def on_policy(self) -> bool:
        """Whether some steps train on the student's own samples (then the teacher is live)."""
        return self.name in ON_POLICY

    def row(self, objective_setting: str) -> str:
        """The leaderboard row (``runs.setting``) of a run of this objective setting under this
        sampler: the objective's alone for ``off``, else ``<objective>+<sampler>`` (``kl+imitkd``),
        a row of its own, paired with the off-policy one on the same prompts."""
        return objective_setting + (f"+{self.setting}" if self.name != "off" else "")

    @property
    def student_probability(self) -> float | None:
        """The chance that a step's responses are the student's (None: ``distillm``'s adapts)."""
        if self.name in ("off", "seqkd"):
            return 0.0
        if self.name == "imitkd":
            return 1.0
        return self.params["lmbda"] if self.name == "gkd" else None

    def students_turn(self, seed: int, step: int) -> bool:
        """Whether step ``step`` (0-based) of ``imitkd`` / ``gkd`` trains on the student's samples:
        a coin keyed by (seed, step), so it is the same on every rank and after a resume. ``u`` is
        in [0, 1): a probability of 0 never, 1 always."""
        p = self.student_probability
        if p is None:
            raise ValueError(f"sampler {self.name} decides by its schedule, not by a fixed coin")
        if p <= 0.0 or p >= 1.0:
            return p >= 1.0
        return keyed_uniform(seed, step) < p


def get_sampler(text: str) -> Sampler:
    """``"gkd(lmbda=0.5)"`` → the resolved :class:`Sampler`; a mistake is one :class:`UserError` line."""
    try:
        name, given = parse_setting(str(text).strip())
    except ObjectiveError as exc:
        raise UserError(str(exc).replace("objective setting", "sampler")) from None
    spec = SAMPLERS.get(name)
    if spec is None:
        raise UserError(did_you_mean(name, list(SAMPLERS), what="sampler"))
    params = dict(spec.defaults)
    for key, raw in given.items():
        if key not in spec.defaults:
            owners = [s.name for s in SAMPLERS.values() if key in s.defaults]
            where = f" (it is {', '.join(owners)}'s)" if owners else ""
            takes = f"takes {', '.join(sorted(spec.defaults))}" if spec.defaults else "takes no parameters"
            raise UserError(f"sampler {name} has no parameter {key!r}{where}; {name} {takes}")
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"sampler {name}: {key}={raw!r} is not a number") from None
        low, high = spec.ranges[key]
        if not low <= value <= high:  # NaN fails too
            raise UserError(f"sampler {name}: {key} must be in [{low:g}, {high:g}], got {raw}")
        if key in spec.whole:
            if value != int(value):
                raise UserError(f"sampler {name}: {key} must be a whole number, got {raw}")
            value = int(value)
        params[key] = value
    return Sampler(name, params)


class SampledBatches:
    """The batch source of an on-policy run: the dataset's batches (``source``) in their order,
    each answered by the student (``model``) where the sampler says so (module docstring).
    ``state_dict`` / ``load_state_dict`` hold the source's cursor, the step count and, for
    ``distillm``, its schedule and buffer: all a resumed run needs to draw what the
    uninterrupted one drew.

    ``distillm`` also needs ``steps`` (the run's budget: its fresh-sample share decreases over
    it), ``valid_every`` (steps between observations of the validation loss; step 0 first) and
    ``valid_examples`` (``(id, Encoded)`` with their reference responses)."""

    def __init__(self, source, sampler: Sampler, model: torch.nn.Module, *, seed: int, eos_id: int, pad_id: int,
                 max_new_tokens: int, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, device: torch.device | str = "cpu", bf16: bool = True,
                 steps: int = 0, valid_every: int = 0, valid_examples=()):
        if not sampler.on_policy:
            raise ValueError(f"sampler {sampler.setting} does not sample the student")
        self.source, self.sampler, self.model = source, sampler, model
        self.seed, self.eos_id, self.pad_id = seed, eos_id, pad_id
        self.max_new_tokens, self.max_tokens = max_new_tokens, max_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.device, self.bf16 = torch.device(device), bf16
        self.step = 0
        self.last: list[list[int]] | None = None  # the latest step's sampled responses (None: the dataset's)
        self.schedule = self.buffer = None
        if sampler.name == "distillm":
            if steps < 1 or valid_every < 1 or not valid_examples:
                raise ValueError("distillm needs the run's steps, a validation interval and validation examples")
            self.schedule = AdaptiveSchedule(sampler.params["p0"], sampler.params["eps"], sampler.params["delta"],
                                             steps)
            self.buffer = ReplayBuffer(sampler.params["capacity"])
            self.valid_every, self.valid_examples = valid_every, list(valid_examples)
        # what this process sampled (a resumed run counts from its resume): the run's cost
        self.student_steps = self.replay_steps = self.generated_tokens = self.cut_responses = 0
        self.generation_s = self.validation_s = 0.0

    def __iter__(self):
        return self

    def whose(self, step: int) -> str:
        """Where step ``step``'s (0-based) responses come from: ``"dataset"``, ``"student"`` or
        ``"replay"``. ``distillm`` first observes the validation loss where one is due."""
        if self.schedule is None:
            return "student" if self.sampler.students_turn(self.seed, step) else "dataset"
        if step % self.valid_every == 0:
            t0 = time.perf_counter()
            loss = validation_loss(self.model, self.valid_examples, batch_size=self.source.batch_size,
                                   pad_id=self.pad_id, device=self.device, bf16=self.bf16)
            self.schedule.observe(step, loss)
            self.validation_s += time.perf_counter() - t0
        return self.schedule.choose(step, keyed_uniform(self.seed, step), self.buffer)

    def __next__(self) -> Batch:
        step, self.step = self.step, self.step + 1
        batch = next(self.source)  # the dataset's: the order and its cursor move whoever answers
        whose = self.whose(step)
        if whose == "dataset":
            self.last = None
            return batch
        if whose == "replay":
            drawn = self.buffer.draw(len(batch.example_ids), self.seed, step)
            self.last = [list(s.response) for s in drawn]
            self.replay_steps += 1
            return pack([s.encoded() for s in drawn], [s.key for s in drawn], self.pad_id)
        prompts = [e.ids[:e.n_prompt] for e in batch.encoded]
        keys = [f"{i}@step{step + 1}" for i in batch.example_ids]  # new sequences: new ids, new draws
        responses = self._sample(prompts, keys)
        if self.buffer is not None:
            self.buffer.add(KeptSample(k, tuple(p), tuple(r)) for k, p, r in zip(keys, prompts, responses))
        return pack([Encoded(p + r, len(p)) for p, r in zip(prompts, responses)], keys, self.pad_id)

    def _sample(self, prompts: list[list[int]], keys: list[str]) -> list[list[int]]:
        """The student's responses to ``prompts``, sampled as evaluation samples (module docstring)."""
        t0 = time.perf_counter()
        n_new = max(1, min(self.max_new_tokens, self.max_tokens - max(len(p) for p in prompts)))
        training = self.model.training
        self.model.eval()  # no dropout, and transformers' checkpointing switches the KV cache off in train mode
        try:
            with torch.no_grad(), autocast_context(self.device, self.bf16):
                responses = decode(self.model, prompts, max_new_tokens=n_new, eos_id=self.eos_id, pad_id=self.pad_id,
                                   seed=self.seed, keys=keys, device=self.device, **self.sampling)
        finally:
            self.model.train(training)
        self.last = responses
        self.student_steps += 1
        self.generated_tokens += sum(len(r) for r in responses)
        self.cut_responses += sum(1 for r in responses if r[-1:] != [self.eos_id])
        self.generation_s += time.perf_counter() - t0
        return responses

    def peek(self) -> Batch:
        """The dataset's next batch (the start-up check's), cursor unmoved."""
        return self.source.peek()

    def state_dict(self) -> dict:
        state = {**self.source.state_dict(), "sampler": self.sampler.setting, "sampler_step": self.step}
        if self.schedule is not None:
            state["schedule"], state["buffer"] = self.schedule.state_dict(), self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler", "off") != self.sampler.setting:
            raise ValueError(f"train state of sampler {state.get('sampler', 'off')} cannot resume sampler "
                             f"{self.sampler.setting}")
        own = ("sampler", "sampler_step", "schedule", "buffer")
        self.source.load_state_dict({k: v for k, v in state.items() if k not in own})
        self.step = int(state["sampler_step"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
            self.buffer.load_state_dict(state["buffer"])

    def describe(self) -> dict:
        """The data order (the source's) and how responses are sampled: stored with the run."""
        return {**self.source.describe(), "sampler": self.sampler.setting}

    def cost(self) -> dict:
        """What sampling cost this process, and (``distillm``) where its schedule ended: the run's
        ``cost`` artifact."""
        cost = {"sampler_student_steps": self.student_steps, "sampler_generated_tokens": self.generated_tokens,
                "sampler_cut_responses": self.cut_responses, "sampler_generation_s": self.generation_s,
                "sampler_generated_tokens_per_s": self.generated_tokens / self.generation_s
                if self.generation_s > 0 else 0.0}
        if self.schedule is not None:
            cost.update(sampler_replay_steps=self.replay_steps, sampler_validation_s=self.validation_s,
                        sampler_final_p=self.schedule.p, sampler_raised_at=list(self.schedule.raised_at),
                        sampler_buffer_size=len(self.buffer))
        return cost
