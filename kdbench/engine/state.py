"""The train state: everything a run needs to continue exactly where it stopped.

``TrainState`` holds the counters, the best-so-far (checkpoint selection) and the logging
window; together with the model weights, the optimiser state, the RNG states and the batch
source's cursor it is what :func:`save` writes and :func:`load` restores. Tensors go to one
safetensors file, everything else to JSON — no pickle, so a state folder from elsewhere
cannot run code. Both files are written to a temporary sibling and renamed into place, so a
run killed while saving leaves the previous state intact.

The learning-rate schedule is a pure function of the step (:func:`lr_at`), so it has no
state of its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STATE_FORMAT = 1


def lr_at(step: int, spec) -> float:
    """Linear warm-up to ``spec.lr`` over ``warmup_steps``, then cosine decay to
    ``lr * lr_min_ratio`` at the last step (``step`` counts from 0)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    floor = spec.lr * spec.lr_min_ratio
    return floor + 0.5 * (spec.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    step: int = 0                       # optimiser steps done
    tokens: int = 0                     # real tokens through the model so far
    counted: int = 0                    # positions the objective counted so far
    train_time_s: float = 0.0           # training wall time so far, validation excluded
    best_score: float = -math.inf       # checkpoint selection: best validation score so far
    best_step: int | None = None        #   ... and its step (ties keep the earlier)
    valid_scores: dict = field(default_factory=dict)  # step -> validation score
    window: dict = field(default_factory=lambda: {"loss": 0.0, "terms": {}, "n": 0})  # log averaging
    best_weights: dict | None = field(default=None, repr=False)  # the best checkpoint's tensors

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("best_weights")
        d["valid_scores"] = {str(k): v for k, v in self.valid_scores.items()}
        return d

    @classmethod
    def from_meta(cls, meta: dict, best_weights: dict | None) -> "TrainState":
        meta = dict(meta)
        meta["valid_scores"] = {int(k): v for k, v in meta.get("valid_scores", {}).items()}
        return cls(**meta, best_weights=best_weights)


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def save(folder: Path, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         batches, extra: dict | None = None) -> Path:
    """Write the full train state to ``folder`` (atomically replacing an older one)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        tensors[f"model.{name}"] = t.detach()
    opt = optimizer.state_dict()
    for idx, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach()
    for name, t in (state.best_weights or {}).items():
        tensors[f"best.{name}"] = t
    tensors.update(_rng_state())
    # safetensors refuses shared storage (tied weights): store contiguous copies
    tensors = {k: v.contiguous().clone() if _shares(v, tensors, k) else v.contiguous() for k, v in tensors.items()}
    meta = {"format": STATE_FORMAT, "train": state.meta(), "batches": batches.state_dict(),
            "optim_groups": opt["param_groups"],
            "optim_scalars": {str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                              for i, s in opt["state"].items()},
            "python_random": _py_random_state(), **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches) -> tuple[TrainState, dict]:
    """Restore what :func:`save` wrote; returns the train state and the saved JSON."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"train state {folder} has format {meta.get('format')}, this kdbench reads {STATE_FORMAT}")
    tensors = load_file(str(folder / "tensors.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta["optim_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optim_groups"]})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    _set_py_random_state(meta["python_random"])
    batches.load_state_dict(meta["batches"])
    return TrainState.from_meta(meta["train"], best), meta


def _shares(v: torch.Tensor, tensors: dict, key: str) -> bool:
    ptr = v.untyped_storage().data_ptr()
    return any(k != key and t.untyped_storage().data_ptr() == ptr for k, t in tensors.items())


def _py_random_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_random_state(s) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))
