"""The train state: everything a run needs to continue exactly where it stopped.

``TrainState`` holds the counters, the best-so-far (checkpoint selection) and the logging
window; together with the model weights, the optimiser state, the RNG states (the CPU
generator and the run device's CUDA generator) and the batch source's cursor it is what
:func:`save` writes and :func:`load` restores. Tensors go to safetensors files, everything
else to JSON — no pickle, so a state folder from elsewhere
cannot run code. The folder is written as a temporary sibling and renamed into place, so a
run killed while saving leaves the previous state intact.

Memory: a checkpoint of a 113M-parameter student with AdamW is ~1.4 GB of tensors, so
nothing here gathers them: :func:`write_safetensors` streams one tensor at a time from where
it lives, :func:`load` copies one tensor at a time into the model, and the best-so-far
weights (:class:`BestWeights`) can live in a file instead of a second in-memory model.

The learning-rate schedule is a pure function of the step (:func:`lr_at`), so it has no
state of its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import torch

from kdbench.device import cuda_index

STATE_FORMAT = 2  # 2: best weights in their own file (best.safetensors); 1 kept them in tensors.safetensors
READS = (1, 2)    # formats load() restores (a run interrupted under the previous kdbench still resumes)

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Write ``(name, tensor)`` pairs as a safetensors file, one tensor's bytes at a time.

    ``safetensors.torch.save_file`` first copies every tensor into one in-memory buffer (a
    second copy of a whole train state); this writes the header, then each (contiguous)
    tensor's own memory. Names must be unique; tensors sharing storage (tied weights) are
    simply written twice. Read back with ``safetensors.safe_open`` / ``load_file``."""
    items = [(name, t.detach()) for name, t in tensors]
    header: dict = {}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class BestWeights:
    """The best-so-far weights of checkpoint selection.

    ``BestWeights()`` keeps a copy in memory; ``BestWeights(path)`` keeps it in one
    safetensors file at ``path`` (written atomically, streamed), so a run does not hold a
    second copy of the model for the rest of training. :meth:`restore` copies it back into the
    model in place, one tensor at a time."""

    def __init__(self, path: Path | None = None):
        self.path = None if path is None else Path(path)
        self._memory: dict[str, torch.Tensor] | None = None
        self.present = False

    def __bool__(self) -> bool:
        return self.present

    def keep(self, model: torch.nn.Module) -> None:
        if self.path is None:
            # a sharded student's (kdbench/engine/fsdp.py) are its DTensor shards: each rank keeps its own
            self._memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            if any(hasattr(v, "full_tensor") for v in model.state_dict().values()):
                raise ValueError("a sharded student keeps its best weights in memory (BestWeights(), each rank "
                                 "its shards), not in one file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            write_safetensors(tmp, model.state_dict().items())
            os.replace(tmp, self.path)
        self.present = True

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        if not self.present:
            raise ValueError("no best weights kept yet")
        if self._memory is not None:
            model.load_state_dict(self._memory)
            return
        _copy_into(model.state_dict(), self.path, "")

    def in_memory(self) -> dict[str, torch.Tensor] | None:
        """The weights kept in memory (name -> tensor), or None (none kept, or kept in a file)."""
        return self._memory if self.present else None

    def save_into(self, path: Path) -> None:
        """Put these weights into a checkpoint folder as ``path`` (a hard link where possible)."""
        if self._memory is not None:
            write_safetensors(path, self._memory.items())
            return
        try:
            os.link(self.path, path)
        except OSError:
            shutil.copyfile(self.path, path)

    def adopt_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take weights given as tensors (a format-1 checkpoint's ``best.*``)."""
        if self.path is None:
            self._memory = dict(tensors)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(self.path, tensors.items())
        self.present = True

    def adopt(self, path: Path) -> None:
        """Take the weights a checkpoint holds at ``path`` (on resume)."""
        if self.path is None:
            from safetensors.torch import load_file

            self._memory = load_file(str(path))
        elif not (self.path.exists() and os.path.samefile(path, self.path)):  # a run's own checkpoint links its file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            shutil.copyfile(path, tmp)  # then rename: never write into a file a checkpoint may link
            os.replace(tmp, self.path)
        self.present = True


@torch.no_grad()
def _copy_into(targets: dict[str, torch.Tensor], path: Path, prefix: str) -> set[str]:
    """Copy the tensors named ``prefix + name`` in the safetensors file at ``path`` into
    ``targets[name]`` one at a time; returns the names copied."""
    from safetensors import safe_open

    done = set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix) and key[len(prefix):] in targets:
                targets[key[len(prefix):]].copy_(f.get_tensor(key))
                done.add(key[len(prefix):])
    return done


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
    best: BestWeights = field(default_factory=BestWeights, repr=False)  # the best checkpoint's weights

    def meta(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best"}  # no copy of the weights
        d["valid_scores"] = {str(k): v for k, v in self.valid_scores.items()}
        return json.loads(json.dumps(d))

    @classmethod
    def from_meta(cls, meta: dict, best: BestWeights | None = None) -> "TrainState":
        meta = dict(meta)
        meta["valid_scores"] = {int(k): v for k, v in meta.get("valid_scores", {}).items()}
        return cls(**meta, best=best if best is not None else BestWeights())


def _run_device(model: torch.nn.Module, device) -> torch.device:
    """The device a run trains on: ``device`` when given, else where the model's weights are."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a run draws from: the CPU's and, on CUDA, the run device's only. Every
    visible GPU's by index (what format 2 wrote before) would tie a checkpoint to the number of
    GPUs the process saw, and carries nothing the run used."""
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_cuda_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """The run device's CUDA generator as it was saved. A checkpoint written by an earlier kdbench
    holds every visible GPU's state by index (``rng.cuda.<i>``): the run device's index is taken.
    A CPU run has no CUDA generator to restore; a checkpoint without CUDA state (made on the CPU)
    leaves the generator as the run seeded it."""
    if device.type != "cuda":
        return
    state = rng.get("rng.cuda")
    if state is None:
        state = rng.get(f"rng.cuda.{cuda_index(device)}")
    if state is not None:
        torch.cuda.set_rng_state(state, device)


def save(folder: Path, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         batches, extra: dict | None = None, *, device: torch.device | str | None = None) -> Path:
    """Write the full train state to ``folder`` (atomically replacing an older one), streamed
    tensor by tensor from the model and the optimiser (no copy of either is made). ``device``:
    the run's (default: where the model's weights are), whose CUDA generator is saved."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        tensors[f"model.{name}"] = t
    opt = optimizer.state_dict()
    for idx, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
    tensors.update(_rng_state(_run_device(model, device)))
    meta = {"format": STATE_FORMAT, "train": state.meta(), "batches": batches.state_dict(),
            "optim_groups": opt["param_groups"],
            "optim_scalars": {str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                              for i, s in opt["state"].items()},
            "python_random": _py_random_state(), **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        write_safetensors(tmp / "tensors.safetensors", tensors.items())
        if state.best:
            state.best.save_into(tmp / "best.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))
        replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete ``tmp`` in ``folder``'s place: the old state renamed aside first, so a kill
    between the two renames leaves one whole state (``<folder>.old``, which :func:`load` reads)."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches,
         best: BestWeights | None = None, *, device: torch.device | str | None = None) -> tuple[TrainState, dict]:
    """Restore what :func:`save` wrote (model weights copied in place, one tensor at a time);
    returns the train state (its best weights taken into ``best`` when given) and the saved JSON.
    ``device``: the run's (default: where the model's weights are), whose CUDA generator is restored."""
    from safetensors import safe_open

    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") not in READS:
        from kdbench.errors import UserError

        raise UserError(f"train state {folder} has format {meta.get('format')}; this kdbench reads formats "
                        f"{', '.join(map(str, READS))} (start the run again instead of resuming it)")
    path = folder / "tensors.safetensors"
    targets = model.state_dict()
    missing = set(targets) - _copy_into(targets, path, "model.")
    if missing:
        raise ValueError(f"train state {folder} lacks model tensors: {sorted(missing)[:3]}")
    opt_state: dict = {}
    rng: dict[str, torch.Tensor] = {}
    old_best: dict[str, torch.Tensor] = {}  # format 1 kept the best weights here as best.*
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = f.get_tensor(key)
            elif key.startswith("rng."):
                rng[key] = f.get_tensor(key)
            elif key.startswith("best."):
                old_best[key[5:]] = f.get_tensor(key)
    for idx, scalars in meta["optim_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optim_groups"]})
    best = best if best is not None else BestWeights()
    if (folder / "best.safetensors").is_file():
        best.adopt(folder / "best.safetensors")
    elif old_best:
        best.adopt_tensors(old_best)
    torch.set_rng_state(rng["rng.torch"])
    _restore_cuda_rng(rng, _run_device(model, device))
    _set_py_random_state(meta["python_random"])
    batches.load_state_dict(meta["batches"])
    return TrainState.from_meta(meta["train"], best), meta


def _py_random_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_py_random_state(s) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))
