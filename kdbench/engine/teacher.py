"""Teacher sources: where a step's teacher targets come from.

The trainer asks a source for the teacher's **final hidden states at the batch's counted
positions** (``[N, d_t]``, in ``Batch.counted`` order) and turns them into logits per chunk
through :attr:`TeacherSource.head`, exactly as it does for the student. Two sources:

* :class:`LiveTeacher` runs the frozen teacher's transformer body on every batch (needed for
  on-policy data, whose sequences are new every step);
* :class:`CachedTeacher` reads the hidden states that :mod:`kdbench.engine.teacher_cache`
  computed once per suite version, so later off-policy runs never run the teacher's body.

Both give the same logits up to the float rounding of different batch shapes (the cache is
built with other batch compositions than training uses); tests/test_teacher_cache.py states
and checks the tolerance.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor

from kdbench.data.batching import Batch
from kdbench.modeling import final_hidden, head_params


class TeacherHead:
    """The frozen output head: ``weight [V, d]`` (and ``bias [V]``, float32), no gradient.

    The weight is held in bfloat16 when that represents it exactly (a bf16 teacher's head, or
    its float32 copy in the cache), else in float32: the losses make float32 logits from it per
    chunk (kdbench/losses.py ``_logits``), so the logits are bitwise the same either way, and a
    training step holds 57 MB instead of 113 MB for SmolLM2's 49,152 x 576 head (at the step's
    memory peak; docs/performance.md, "the default run under 3 GB")."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        w = weight.detach()
        if w.dtype == torch.bfloat16:
            self.weight = w
        else:  # a float copy (the cache's file): narrowed only when no value changes
            narrow = w.to(torch.bfloat16)
            self.weight = narrow if torch.equal(narrow.to(w.dtype), w) else w.float()
        self.bias = None if bias is None else bias.detach().float()

    def to(self, device) -> "TeacherHead":
        return TeacherHead(self.weight.to(device), None if self.bias is None else self.bias.to(device))


class TeacherSource(Protocol):
    head: TeacherHead
    kind: str  # "live" | "cache"

    def hidden(self, batch: Batch) -> Tensor:
        """``[batch.n_counted, d_t]`` teacher final hidden states, no gradient."""
        ...


class LiveTeacher:
    """Runs the frozen teacher (held in its inference dtype, bf16 where native) on each batch."""

    kind = "live"

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.head = TeacherHead(*head_params(model))

    @torch.inference_mode()
    def hidden(self, batch: Batch) -> Tensor:
        return final_hidden(self.model, batch)


class CachedTeacher:
    """Teacher hidden states read from a published cache entry (memory-mapped)."""

    kind = "cache"

    def __init__(self, entry, device: torch.device | str = "cpu"):
        self.entry = entry
        self.head = entry.head().to(device)
        self.device = torch.device(device)

    def hidden(self, batch: Batch) -> Tensor:
        rows = self.entry.rows(batch.example_ids, batch.encoded)
        if rows.shape[0] != batch.n_counted:
            raise RuntimeError(f"teacher cache {self.entry.key}: {rows.shape[0]} cached positions for a batch with "
                               f"{batch.n_counted} counted positions (stale entry?)")
        return rows.to(self.device)


class TimedTeacher:
    """A teacher source that adds up the seconds its :meth:`hidden` takes (``seconds``), the
    teacher's scoring in a run's cost (an on-policy run's: kdbench/recipe.py). On a GPU each call
    waits for the device, so the seconds are the teacher's own; everything else is the source's."""

    def __init__(self, source):
        self.source = source
        self.seconds = 0.0

    def hidden(self, batch: Batch) -> Tensor:
        t0 = time.perf_counter()
        out = self.source.hidden(batch)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name):  # kind, head, model: the source's
        return getattr(self.source, name)
