"""DistiLLM's adaptive off-policy schedule and its replay buffer (Ko et al. 2024, *DistiLLM:
Towards Streamlined Distillation for Large Language Models*; the ``distillm`` sampler,
kdbench/engine/samplers.py).

DistiLLM trains on the dataset's responses until the student's validation loss says it is
drifting, then more and more on student-generated responses, most of them replayed from a
buffer rather than sampled anew (generation is the expensive part). Per step, with ``p`` the
current probability of student responses and ``u`` a uniform keyed by (seed, step)::

    fresh  = p * (1 - (step + 1) / steps)        # "decreasing" replay ratio: later steps replay more
    u < fresh  or  (u < p and buffer not full)  -> sample the student anew; push into the buffer
    u < p                                       -> replay: k sequences drawn from the buffer
    otherwise                                   -> the dataset's responses

and at every validation point (step 0 first) the student's loss on the validation set is
observed: a rise of at least ``eps`` over the last loss that raised ``p`` (the first loss, at
first) raises ``p`` by ``delta`` (at most 1) — DistiLLM's ``finetune.py`` with its scripts'
``--init-threshold 0 --loss-eps 0.1 --capacity 1000`` and its default replay ratio.

What differs from DistiLLM's code, on purpose: every draw is keyed by (run seed, step) instead
of a per-rank ``np.random`` stream (its ranks are seeded ``seed + rank`` and so flip their own
coins), so every rank makes one decision and a resumed run makes the uninterrupted one's; and
the whole state (``p``, the last loss, the buffer's sequences in order) is in the train state.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.data.batching import Encoded, pack
from kdbench.device import autocast_context
from kdbench.modeling import final_hidden, head_params


def keyed_uniform(seed: int, step: int, stream: str = "coin") -> float:
    """A uniform in [0, 1) from sha256 of (stream, seed, step): no generator, no state, the same
    on every rank and after a resume. ``stream`` tells independent decisions of one step apart."""
    tag = "kdbench-sampler-coin" if stream == "coin" else f"kdbench-sampler-{stream}"
    digest = hashlib.sha256(f"{tag}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class KeptSample:
    """One student sample kept for replay: its key (``<example id>@step<n>``, unique), prompt and response."""

    key: str
    prompt: tuple[int, ...]
    response: tuple[int, ...]

    def encoded(self) -> Encoded:
        return Encoded(list(self.prompt) + list(self.response), len(self.prompt))


class ReplayBuffer:
    """At most ``capacity`` student samples, the oldest evicted first (first in, first out). A
    draw takes ``k`` distinct samples uniformly at random (no replacement, in the drawn order)
    with a generator seeded from (run seed, step): the same draw on every rank and after a resume."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.items: deque[KeptSample] = deque(maxlen=capacity)  # deque's maxlen evicts from the left

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def add(self, samples) -> None:
        self.items.extend(samples)

    def draw(self, k: int, seed: int, step: int) -> list[KeptSample]:
        if not 1 <= k <= len(self.items):
            raise ValueError(f"cannot draw {k} distinct samples from a buffer of {len(self.items)}")
        rng = random.Random(int(keyed_uniform(seed, step, "replay") * 2.0 ** 53))
        return [self.items[i] for i in rng.sample(range(len(self.items)), k)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [[s.key, list(s.prompt), list(s.response)] for s in self.items]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay buffer of capacity {state['capacity']} cannot resume one of {self.capacity}")
        self.items = deque((KeptSample(k, tuple(p), tuple(r)) for k, p, r in state["items"]), maxlen=self.capacity)


class AdaptiveSchedule:
    """DistiLLM's probability ``p`` of student responses and what raises it (module docstring)."""

    def __init__(self, p0: float, eps: float, delta: float, steps: int):
        self.p, self.eps, self.delta, self.steps = float(p0), float(eps), float(delta), int(steps)
        self.last_loss: float | None = None  # the loss that last raised p (the first one observed, at first)
        self.raised_at: list[int] = []       # steps where p rose (recorded with the run)

    def observe(self, step: int, loss: float) -> None:
        if self.last_loss is None:
            self.last_loss = loss
        elif loss >= self.last_loss + self.eps:
            self.p = min(1.0, self.p + self.delta)
            self.last_loss = loss
            self.raised_at.append(step)

    def choose(self, step: int, u: float, buffer: ReplayBuffer) -> str:
        """``"student"``, ``"replay"`` or ``"dataset"`` for step ``step`` (0-based) with uniform ``u``."""
        fresh = self.p * (1.0 - (step + 1) / self.steps)
        if u < fresh or (u < self.p and not buffer.full):
            return "student"
        return "replay" if u < self.p else "dataset"

    def state_dict(self) -> dict:
        return {"p": self.p, "last_loss": self.last_loss, "raised_at": list(self.raised_at)}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.last_loss, self.raised_at = float(state["p"]), state["last_loss"], list(state["raised_at"])


def validation_loss(model: torch.nn.Module, examples: list[tuple[str, Encoded]], *, batch_size: int, pad_id: int,
                    device: torch.device, bf16: bool) -> float:
    """The student's cross-entropy per counted token on ``examples`` (prompt + reference
    response; the response's tokens counted): DistiLLM's validation loss. In eval mode, no
    gradient, under the run's precision; packed ``batch_size`` examples at a time."""
    w, b = head_params(model, torch.float32)
    total, count = 0.0, 0
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for a in range(0, len(examples), batch_size):
                part = examples[a:a + batch_size]
                batch = pack([e for _, e in part], [i for i, _ in part], pad_id).to(device)
                with autocast_context(device, bf16):
                    hidden = final_hidden(model, batch)
                logits = F.linear(hidden.float(), w, b)
                total += float(F.cross_entropy(logits, batch.labels.to(device), reduction="sum"))
                count += batch.n_counted
    finally:
        model.train(training)
    return total / max(count, 1)
