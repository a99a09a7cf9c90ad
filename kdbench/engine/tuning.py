"""The training step's settings per device, chosen in one place.

Four settings of a step cost time or memory without changing what is computed beyond float
rounding: how many counted positions make one chunk of logits, how many bytes of a chunk's logits
the objective's row function takes at once, whether the student's block activations are
recomputed in backward, and how attention keeps a packed row's sequences apart. The CPU values
were measured on 2 cores (docs/performance.md); a GPU wants others: few large kernels instead of
cache-sized blocks, and activations kept where they fit. :func:`step_tuning` chooses them,
:class:`StepTuning` holds them, the trainer takes one (``train(tuning=...)``, default
``step_tuning(device, ...)``) and a run records the one it trained with (``config["step_tuning"]``).

On the CPU :func:`step_tuning` returns exactly the values every stored result was made with, so
CPU runs are bitwise what they were.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from kdbench.device import native_bf16
from kdbench.losses import HIDDEN_CHUNK_SIZE, ROW_BLOCK_BYTES
from kdbench.modeling import PACKED_ATTENTION, output_head, supports_per_sequence, unwrap

#: The environment variable that forces activation checkpointing on (any value but ``0``) or off (``0``).
CHECKPOINTING_ENV = "KDBENCH_ACTIVATION_CHECKPOINTING"
#: The CPU's activation checkpointing: on (docs/performance.md, "the default run under 3 GB": the
#: standard run's peak under 3 GB for ~25 % more training time), unless the variable turns it off.
ACTIVATION_CHECKPOINTING = os.environ.get(CHECKPOINTING_ENV, "1") != "0"

#: CUDA: counted positions per logits chunk. Provisional, not measured yet: a GPU wants fewer,
#: larger head products than the CPU's 256 rows, and 2,048 rows of GPT-2's 50,257-token vocabulary
#: are 412 MB of float32 logits per buffer. benchmarks/gpu_check.py section 2 arm (c) measures this
#: setting against the CPU's (arm a) on one GPU; the value follows from that run.
CUDA_CHUNK_SIZE = 2048
#: CUDA: train with activations kept when the estimated step (:class:`MemoryEstimate`) takes at
#: most this fraction of the memory available to it. The rest is margin for what the estimate
#: leaves out: the caching allocator's fragmentation, cuBLAS workspaces, transient kernel buffers.
CUDA_MEMORY_FRACTION = 0.8
#: The widest output head the row block of a chunk is sized for when no model is given (Gemma's
#: 256k vocabulary): one block per chunk whatever the head.
MAX_VOCAB = 262_144

# The memory estimate's constants (an estimate of a Llama or GPT-2 block; gpu_check reports the
# measured peak beside it, which is what will correct them).
#: Bytes one trainable float32 parameter holds in training: weight, gradient, AdamW's two moments.
STATE_BYTES_PER_PARAM = 16
#: Tensors of hidden width one block keeps per token for backward, in its compute dtype: the two
#: norms' outputs, q, k, v, the attention output, the output projection's input, and their
#: rotary / residual companions.
ACTIVATION_HIDDEN_WIDTHS = 16
#: Tensors of the MLP's intermediate width it keeps per token: up, gate, activation, product.
ACTIVATION_FFN_WIDTHS = 5
#: float32 tensors of hidden width per token per block that stay float32 under autocast (the
#: residual stream into each norm).
ACTIVATION_FLOAT32_WIDTHS = 2
#: float32 ``[chunk, V]`` buffers the loss holds at once: student and teacher logits, the
#: gradient, the objective's intermediates.
LOSS_CHUNK_BUFFERS = 6


@dataclass(frozen=True)
class StepTuning:
    """One device's step settings (what :func:`step_tuning` chose; ``reason`` says how the
    activation checkpointing was chosen, and is recorded, not compared)."""

    chunk_size: int                   # counted positions per logits chunk (losses.chunked_head_loss)
    row_block_bytes: int              # bytes of a chunk's logits per row-function call (losses.blockwise_rows)
    activation_checkpointing: bool    # recompute the student's block activations in backward
    packed_attention: str             # modeling.PACKED_ATTENTION: "dense" or "per_sequence"
    reason: str = field(default="", compare=False)

    def __post_init__(self):
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION}, got {self.packed_attention!r}")
        if self.chunk_size < 1 or self.row_block_bytes < 1:
            raise ValueError(f"chunk_size and row_block_bytes must be positive, got {self.chunk_size}, "
                             f"{self.row_block_bytes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepTuning":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def cpu_tuning(activation_checkpointing: bool | None = None) -> StepTuning:
    """The CPU's settings: today's constants, with activation checkpointing on unless overridden."""
    override = _override(activation_checkpointing)
    ckpt = ACTIVATION_CHECKPOINTING if override is None else override[0]
    return StepTuning(HIDDEN_CHUNK_SIZE, ROW_BLOCK_BYTES, ckpt, "dense",
                      reason="cpu default" if override is None else override[1])


def _override(activation_checkpointing: bool | None) -> tuple[bool, str] | None:
    """The user's choice of activation checkpointing: the argument (the run's ``--keep-activations``),
    else :data:`CHECKPOINTING_ENV` where it is set; None where neither says."""
    if activation_checkpointing is not None:
        return bool(activation_checkpointing), "set by the caller"
    env = os.environ.get(CHECKPOINTING_ENV)
    if env is not None:
        return env != "0", f"{CHECKPOINTING_ENV}={env}"
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """What one training step of a float32 student needs on a GPU, in bytes, and what it has."""

    state: int                   # weights, gradients and AdamW moments (STATE_BYTES_PER_PARAM a parameter)
    activations: int             # the blocks' activations kept for backward at the longest packed row
    checkpointed: int            # what checkpointing keeps instead: each block's float32 input
    loss: int                    # one logits chunk's buffers, and the teacher's rows
    available: int               # free device memory + the allocator's cached blocks + the student's weights there

    @property
    def with_activations(self) -> int:
        return self.state + self.activations + self.loss

    @property
    def fits(self) -> bool:
        """Whether the step with activations kept fits with margin (:data:`CUDA_MEMORY_FRACTION`)."""
        return self.with_activations <= CUDA_MEMORY_FRACTION * self.available

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"estimate {self.with_activations / gib:.1f} GiB with activations kept "
                f"({'<=' if self.fits else '>'} {CUDA_MEMORY_FRACTION:g} x {self.available / gib:.1f} GiB available): "
                f"{'off' if self.fits else 'on'}")


def estimate_memory(*, params: int, layers: int, hidden: int, intermediate: int, vocab: int, tokens: int,
                    chunk_size: int, compute_bytes: int, available: int, teacher_hidden: int = 0) -> MemoryEstimate:
    """:class:`MemoryEstimate` from numbers only: ``params`` trainable float32 parameters, ``layers``
    blocks of width ``hidden`` with an MLP of ``intermediate``, a ``vocab``-row head, packed rows of
    at most ``tokens`` tokens, ``chunk_size``-row logits chunks, ``compute_bytes`` per activation
    element (2 under bf16 autocast, 4 in float32), ``available`` bytes, and a teacher of width
    ``teacher_hidden`` whose float32 rows the step holds (0: none)."""
    per_token_block = (compute_bytes * (ACTIVATION_HIDDEN_WIDTHS * hidden + ACTIVATION_FFN_WIDTHS * intermediate)
                       + 4 * ACTIVATION_FLOAT32_WIDTHS * hidden)
    rows = min(chunk_size, tokens)
    return MemoryEstimate(
        state=STATE_BYTES_PER_PARAM * params,
        activations=layers * tokens * per_token_block,
        checkpointed=layers * tokens * 4 * hidden,
        loss=LOSS_CHUNK_BUFFERS * rows * vocab * 4 + tokens * teacher_hidden * 4,
        available=available,
    )


def model_shape(model) -> dict | None:
    """``{params, layers, hidden, intermediate, vocab}`` of a transformers causal LM (trainable
    parameters only); None for a model whose config does not say."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    return {"params": sum(p.numel() for p in lm.parameters() if p.requires_grad), "layers": int(layers),
            "hidden": int(hidden), "intermediate": int(intermediate), "vocab": int(output_head(lm).weight.shape[0])}


def available_memory(device: torch.device, model=None) -> int:
    """Bytes a training step can use on a CUDA device: ``torch.cuda.mem_get_info``'s free memory,
    the blocks torch's caching allocator holds unused, and the student's weights already there
    (the estimate counts them in its state)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    resident = 0 if model is None else sum(p.numel() * p.element_size() for p in unwrap(model).parameters()
                                           if p.is_cuda)
    return int(free + cached + resident)


def step_tuning(device: torch.device | str, *, model=None, spec=None, teacher=None,
                activation_checkpointing: bool | None = None, available: int | None = None) -> StepTuning:
    """The step settings for ``device``.

    * **CPU** (and any device but CUDA): :func:`cpu_tuning`, today's values: 256-row chunks
      (:data:`kdbench.losses.HIDDEN_CHUNK_SIZE`), 1 MB row blocks (:data:`kdbench.losses.ROW_BLOCK_BYTES`),
      dense packed attention, activation checkpointing on unless the caller or
      :data:`CHECKPOINTING_ENV` says otherwise.
    * **CUDA**: :data:`CUDA_CHUNK_SIZE`-row chunks (provisional, see there) in one row block each
      (``row_block_bytes`` = the chunk's float32 logits: the row function runs once per chunk, not
      once per 5 rows); per-sequence packed attention where ``model`` supports it
      (kdbench/modeling.py); activation checkpointing as the caller (``activation_checkpointing``,
      a run's ``--keep-activations``) or :data:`CHECKPOINTING_ENV` says, else from
      :func:`estimate_memory` for ``model`` (the float32 student), ``spec`` (its longest packed row:
      ``batch_size`` x ``max_tokens``; bf16 autocast) and ``teacher`` (its rows), against
      ``available`` bytes (default :func:`available_memory`): off when the step fits with margin,
      on otherwise (and on when there is no model or spec to estimate from).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_tuning(activation_checkpointing)
    shape = model_shape(model) if model is not None else None
    chunk = CUDA_CHUNK_SIZE
    row_block_bytes = chunk * (shape["vocab"] if shape else MAX_VOCAB) * 4
    packed = "per_sequence" if model is None or supports_per_sequence(unwrap(model)) else "dense"
    override = _override(activation_checkpointing)
    if override is not None:
        return StepTuning(chunk, row_block_bytes, override[0], packed, reason=override[1])
    if shape is None or spec is None:
        return StepTuning(chunk, row_block_bytes, True, packed, reason="no model or spec to estimate memory from: on")
    head = getattr(teacher, "head", None)
    estimate = estimate_memory(
        params=shape["params"], layers=shape["layers"], hidden=shape["hidden"], intermediate=shape["intermediate"],
        vocab=shape["vocab"], tokens=spec.batch_size * spec.max_tokens, chunk_size=chunk,
        compute_bytes=2 if spec.bf16_autocast and native_bf16(device) else 4,
        available=available_memory(device, model) if available is None else int(available),
        teacher_hidden=int(head.weight.shape[1]) if getattr(head, "weight", None) is not None else 0)
    return StepTuning(chunk, row_block_bytes, not estimate.fits, packed, reason=estimate.describe())
