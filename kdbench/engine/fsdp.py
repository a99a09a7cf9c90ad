"""Fully sharded training (FSDP2) for a student, or a teacher fine-tune, whose training state
does not fit one device.

``shard_student(lm, device)`` on every rank returns a :class:`ShardedStudent` to hand to
``train(model=...)`` (kdbench/engine/trainer.py) instead of ``DDP(StudentBody(lm))``:

* **What is sharded.** torch's ``fully_shard`` (``torch.distributed.fsdp``, FSDP2) is applied to
  each decoder block (the classes the model names in ``_no_split_modules``) and then to the
  whole :class:`~kdbench.modeling.StudentLoss` (the root), whose group holds what is left: the
  token embeddings, the output head (the same tensor when tied, as in SmolLM2 and the tiny
  models) and the final norm. Every parameter, its gradient and its AdamW moments live as
  ``DTensor`` shards (dim 0 split over the ranks); a block's weights are gathered whole for its
  forward and again for its backward, the root's for the step's forward and backward.
* **Where the loss is made.** Outside a sharded module's forward its parameters are shards, so
  the trainer's usual ``objective.from_hidden(final_hidden(model, part), head, ...)`` would see
  a shard of the head. The root is a ``StudentLoss``: its forward makes the hidden states *and*
  the chunked loss through the head, inside FSDP's hooks, where the head is whole; its backward
  reduce-scatters the head's (the embeddings') gradient with the root's group.
* **The teacher** is replicated: each rank holds it whole (it is frozen and only read; sharding
  it is a later step). A teacher cache needs no model at all.
* **Gradients** are averaged over the ranks by FSDP's reduce-scatter, as DDP's all-reduce does,
  so the trainer's split of a step (each part's sums over the step's count over ``world``) gives
  the step's mean, and accumulation skips the reduce-scatter but in the last micro-step
  (:meth:`ShardedStudent.no_sync`, FSDP's ``set_requires_gradient_sync``).
* **Validation** needs the whole weights (it decodes): :meth:`ShardedStudent.full_weights`
  gathers each parameter into a *twin* of the LM (its structure copied before sharding, with
  weights on the meta device, so it costs nothing between validations), on every rank, and
  frees them after. The twin is a plain module: no FSDP hook (no collective) runs in
  validation, so each rank decodes on its own, whether it decodes a share of the prompts or
  rank 0 decodes them all while the others wait.
* **Best weights** are kept as the ranks' shards (``BestWeights()`` in memory: each rank holds
  its 1/world of the weights), and restored into the shards.
* **Checkpoints** (:func:`save` / :func:`load`, every rank calls them): torch.distributed.checkpoint
  with its safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)``): each rank
  writes its own shards of the weights, the AdamW moments and the best weights to one
  safetensors file; rank 0 writes the JSON (counters, cursor, optimiser scalars); each rank its
  generators. No pickle is read back (DCP's default storage pickles its metadata; this one keeps
  its offsets in the safetensors headers), as for kdbench/engine/state.py's single-process state.
  A state is restored on the same number of ranks it was saved from.

FSDP2 runs on the CPU with gloo (tests/test_fsdp.py: two processes against one process taking
the whole batch, and a save / resume against the uninterrupted run) as on GPUs with NCCL.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from kdbench.engine.state import (READS as _SINGLE_READS, BestWeights, TrainState, _py_random_state,
                                  _restore_cuda_rng, _rng_state, _set_py_random_state, replace_folder,
                                  write_safetensors)
from kdbench.modeling import StudentLoss, unwrap

SHARDED_FORMAT = "fsdp2-1"  # state.json's "format" of a sharded train state (load() reads only this)
SHARDING = "fsdp2: each decoder block and the root (embeddings, head, final norm) sharded; teacher replicated"


class ShardedStudent(StudentLoss):
    """The student as FSDP2 trains it: a :class:`~kdbench.modeling.StudentLoss` (the loss made
    inside the forward) that :func:`shard_student` has sharded, with what the trainer needs of a
    sharded model: :meth:`no_sync` for accumulation and :meth:`full_weights` for validation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        # The validation twin: the LM's modules, config and buffers copied now, each parameter a
        # meta tensor (tied ones stay one tensor). Made before sharding: a sharded module refuses
        # deepcopy. Set past nn.Module's bookkeeping, so neither FSDP nor state_dict sees it.
        meta = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                for p in model.parameters()}
        object.__setattr__(self, "_twin", copy.deepcopy(model, meta).eval())

    @contextmanager
    def no_sync(self):
        """Backwards inside keep their gradients unreduced (accumulated whole on each rank); the
        first backward after reduce-scatters the sum. DDP's ``no_sync``, for the trainer's
        micro-steps."""
        self.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)

    @contextmanager
    def full_weights(self):
        """Yields the LM with its whole weights: a collective (every rank calls it, and gets the
        weights). Each sharded parameter is gathered (``DTensor.full_tensor``) into the twin; on
        exit the twin's weights go back to the meta device, so the gathered copy lives only
        while validating."""
        twin, lm = self._twin, self.model
        gathered: dict[int, torch.nn.Parameter] = {}
        # the twin was copied from this LM, and FSDP registers each shard under its parameter's
        # own name, so the two lists pair up (one entry per tied tensor)
        with torch.no_grad():
            for (name, p), (twin_name, meta) in zip(lm.named_parameters(), twin.named_parameters(), strict=True):
                if name != twin_name:
                    raise RuntimeError(f"the validation twin has {twin_name} where the student has {name}")
                whole = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                gathered[id(meta)] = torch.nn.Parameter(whole, requires_grad=False)
        slots = [(m, n, p) for m in twin.modules() for n, p in m._parameters.items() if p is not None]
        try:
            for m, n, p in slots:
                m._parameters[n] = gathered[id(p)]
            yield twin
        finally:
            for m, n, p in slots:
                m._parameters[n] = p  # the meta tensors again: the gathered weights are freed


def decoder_blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The LM's repeated blocks, each its own FSDP group: the modules of the classes the model
    says must not be split across devices (transformers' ``_no_split_modules``)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(lm).__name__} names no decoder block class (_no_split_modules): "
                         "kdbench cannot tell which modules to shard one by one")
    return blocks


def shard_student(lm: torch.nn.Module, device: torch.device, *, reshard_after_forward: bool = True) -> ShardedStudent:
    """``lm`` sharded across the process group's ranks (every rank calls it, with the same
    weights), as a :class:`ShardedStudent` for ``train(model=...)``. Call it before making the
    optimiser (which must hold the shards: ``make_optimizer(unwrap(student), ...)``, or let the
    trainer make it). ``lm`` is trained in place: its modules now hold the shards.
    ``reshard_after_forward`` (the blocks'; FSDP's default) frees each block's gathered weights
    after its forward and gathers them again in backward: the memory of one block at a time."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_student needs torch.distributed initialised (one process per rank)")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    lm.to(device)  # the twin's buffers where validation will run
    student = ShardedStudent(lm)
    for block in decoder_blocks(lm):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(student, mesh=mesh)  # the root: what is left (embeddings = head when tied, final norm)
    return student


@contextmanager
def validation_model(model: torch.nn.Module):
    """The LM a validation hook is given: ``model``'s own LM, or a sharded student's whole
    weights in its twin for the hook's duration (a collective: every rank enters)."""
    if isinstance(model, ShardedStudent):
        with model.full_weights() as lm:
            yield lm
    else:
        yield unwrap(model)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a student :func:`shard_student` made."""
    return isinstance(model, ShardedStudent)


# ---------------------------------------------------------------------------------------------
# Sharded train state
# ---------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _tensor_state(model: ShardedStudent, optimizer: torch.optim.Optimizer):
    """``(tensors, model state dict, optimiser state dict)``: the tensors a sharded state holds,
    nested as DCP flattens them (``model.<fqn>``, ``optim.<fqn>.<moment>``; the caller adds
    ``best.<name>``), each a shard where the parameter is one; and the model's and optimiser's
    state dicts by parameter names (torch's ``get_state_dict``: on a fresh optimiser it first
    makes the moments, with a step of learning rate 0, which moves no weight)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors = {"model": _distinct(model_sd),
               "optim": {k: {n: v for n, v in s.items() if isinstance(v, torch.Tensor)}
                         for k, s in optim_sd["state"].items()}}
    return tensors, model_sd, optim_sd


def _distinct(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tensor once, under its first name: a tied weight (the embeddings
    and the head) is one tensor under two names, and safetensors refuses to write memory twice.
    Reading into the first name fills the tensor both names hold."""
    seen, out = set(), {}
    for name, t in state_dict.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        key = ((local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.dtype)
               if local.numel() else id(t))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def save(folder: Path, state: TrainState, model: ShardedStudent, optimizer: torch.optim.Optimizer, batches,
         extra: dict | None = None, *, device: torch.device | str | None = None) -> Path:
    """Write a sharded train state to ``folder`` (every rank calls it): what
    kdbench/engine/state.py's ``save`` writes for one process, each rank writing its own
    shards. Written as ``<folder>.tmp`` and renamed into place by rank 0 once every rank is
    done, so a run killed while saving keeps its previous state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank, world = _rank_world()
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors, _, optim_sd = _tensor_state(model, optimizer)
    best = state.best.in_memory()
    if state.best and best is None:
        raise ValueError("a sharded run keeps its best weights in memory (BestWeights()), as its ranks' shards")
    if best is not None:
        tensors["best"] = best
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    write_safetensors(tmp / f"rank{rank}.safetensors", _rng_state(run_device).items(),
                      metadata={"python_random": json.dumps(_py_random_state())})
    dist.barrier()  # every rank's files are in tmp
    if rank == 0:
        meta = {"format": SHARDED_FORMAT, "world": world, "train": state.meta(), "batches": batches.state_dict(),
                "best": best is not None, "optim_groups": optim_sd["param_groups"],
                "optim_scalars": {k: {n: v for n, v in s.items() if not isinstance(v, torch.Tensor)}
                                  for k, s in optim_sd["state"].items()}, **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(meta))
        replace_folder(tmp, folder)
    dist.barrier()  # no rank goes on (or loads) before the state is in place
    return folder


def load(folder: Path, model: ShardedStudent, optimizer: torch.optim.Optimizer, batches,
         best: BestWeights | None = None, *, device: torch.device | str | None = None) -> tuple[TrainState, dict]:
    """Restore what :func:`save` wrote (every rank calls it, with the model sharded as it was and
    the optimiser made over its shards): the shards of the weights, moments and best weights
    read in place, each rank's generators, the cursor. Returns the train state (its best
    weights in ``best`` when given, which must keep them in memory) and the saved JSON."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from safetensors import safe_open

    from kdbench.errors import UserError

    rank, world = _rank_world()
    folder = Path(folder)
    if not (folder / "state.json").is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != SHARDED_FORMAT:
        what = "a single-process state" if meta.get("format") in _SINGLE_READS else f"format {meta.get('format')}"
        raise UserError(f"train state {folder} is {what}; a sharded run restores format {SHARDED_FORMAT} only")
    if meta["world"] != world:
        raise UserError(f"train state {folder} was saved by {meta['world']} ranks; resume it on {meta['world']}, "
                        f"not {world}")
    tensors, model_sd, optim_sd = _tensor_state(model, optimizer)
    lm = unwrap(model)
    if meta["best"]:
        tensors["best"] = {k: torch.empty_like(v) for k, v in lm.state_dict().items()}
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))  # into the shards, in place
    for k, scalars in meta["optim_scalars"].items():
        optim_sd["state"].setdefault(k, {}).update(scalars)
    optim_sd["param_groups"] = meta["optim_groups"]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    best = best if best is not None else BestWeights()
    if meta["best"]:
        best.adopt_tensors(tensors["best"])
    with safe_open(str(folder / f"rank{rank}.safetensors"), framework="pt") as f:
        rng = {k: f.get_tensor(k) for k in f.keys()}
        py_random = json.loads(f.metadata()["python_random"])
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    torch.set_rng_state(rng["rng.torch"])
    _restore_cuda_rng(rng, run_device)
    _set_py_random_state(py_random)
    batches.load_state_dict(meta["batches"])
    return TrainState.from_meta(meta["train"], best), meta
