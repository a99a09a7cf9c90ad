"""Where training data comes in: the suite's encoded examples as packed batches in a fixed
order, with a resumable cursor.

A step's batch is ``batch_size`` examples drawn in the order fixed by ``(seed, epoch)`` — the
same for every objective, so runs on one suite and seed differ only in the loss — and packed
into one row (``Batch`` and ``pack``, with the shapes: kdbench/data/batching.py).
:func:`micro_batches` is one rank's share of a step's batch when several processes train
together, or when a step accumulates gradients over several micro-batches.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from kdbench.data.batching import Batch, Encoded, pack

ORDER_RULE = "epoch k: random.Random(seed * 100003 + k).shuffle(range(n)); consecutive batch_size slices, last partial dropped"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


class PackedBatches:
    """Endless packed batches in the fixed per-seed order, with a cursor (``state_dict``).

    ``examples`` are ``(example_id, Encoded)`` pairs. The cursor is ``(epoch, index of the next
    batch in the epoch)``; ``load_state_dict`` continues exactly where a saved source stopped
    (the resume seam). ``describe()`` is what a run records about its data order.
    """

    def __init__(self, examples: Sequence[tuple[str, Encoded]], batch_size: int, seed: int, pad_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch of {batch_size}")
        ids = [i for i, _ in examples]
        if len(set(ids)) != len(ids):
            raise ValueError("training example ids must be unique (the teacher cache is indexed by them)")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self._order = epoch_order(len(self.examples), seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        picked = [self.examples[i] for i in self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]]
        self.index += 1
        return pack([e for _, e in picked], [i for i, _ in picked], self.pad_id)

    def peek(self) -> Batch:
        """The batch the next ``next()`` returns, without moving the cursor (the start-up check's batch)."""
        saved = (self.epoch, self.index, self._order)
        try:
            return next(self)
        finally:
            self.epoch, self.index, self._order = saved

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "batch_size": self.batch_size,
                "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["batch_size"], state["n_examples"]) != (self.seed, self.batch_size, len(self.examples)):
            raise ValueError(f"batch cursor {state} does not belong to this data (seed {self.seed}, batch size "
                             f"{self.batch_size}, {len(self.examples)} examples)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)

    def describe(self) -> dict:
        """The order rule, a digest of epoch 0's example order, and the packing (stored with a run)."""
        first = [self.examples[i][0] for i in epoch_order(len(self.examples), self.seed, 0)]
        digest = hashlib.sha256("\n".join(first).encode()).hexdigest()[:16]
        return {"order": ORDER_RULE, "seed": self.seed, "epoch0_order_sha256": digest,
                "packing": "each batch's sequences end to end in one row, positions restart per sequence, no padding",
                "batches_per_epoch": self.batches_per_epoch}


SHARD_RULE = ("a step's example k (its order in the batch) goes to shard k mod (world * accumulation); "
              "rank r's micro-step a trains shard a * world + r")


def check_split(batch_size: int, world: int, accumulation: int) -> None:
    """Refuses a batch too small for a micro-batch of at least one example on every rank and micro-step."""
    if world < 1 or accumulation < 1:
        raise ValueError(f"world size and accumulation must be at least 1, got {world} and {accumulation}")
    if batch_size < world * accumulation:
        raise ValueError(f"a batch of {batch_size} examples cannot be split into {world} processes x {accumulation} "
                         f"accumulation steps = {world * accumulation} micro-batches of at least one example each")


def micro_batches(batch: Batch, rank: int, world: int, accumulation: int) -> list[Batch]:
    """Rank ``rank``'s ``accumulation`` micro-batches of a step's ``batch`` when ``world``
    processes train together (:data:`SHARD_RULE`): the step's examples are dealt round-robin to
    ``world * accumulation`` shards, so every example is trained once, on one rank, and shard
    sizes differ by at most one. Every rank draws the whole step from the same source (the
    suite's order, ``batch_size`` examples, whatever the world size) and keeps its own shards:
    the source's cursor is the same on every rank and for any world size, so a run saved with
    one number of processes resumes with another on the same steps' examples (only their split
    across ranks and micro-steps changes)."""
    n = len(batch.example_ids)
    check_split(n, world, accumulation)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    shards = world * accumulation
    out = []
    for a in range(accumulation):
        picked = range(a * world + rank, n, shards)
        out.append(pack([batch.encoded[k] for k in picked], [batch.example_ids[k] for k in picked], batch.pad_id))
    return out
