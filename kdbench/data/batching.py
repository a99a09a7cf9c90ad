"""Examples → tokens → batches: prompt in the chat template, loss only on the response.

``encode`` is the one tokenisation of a training example. ``pack`` lays encoded examples end
to end in one row — a :class:`Batch`, the shape training (kdbench/engine/batches.py draws the
examples in their order) and evaluation (the reference KL) run models on: positions restart at
0 for each sequence, so attention stays within a sequence and no position is padding. The
objective counts only response positions; their flat indices into the packed row are
``Batch.counted``, in example order. Packed shapes (L = the batch's real tokens, N = its
counted positions)::

    input_ids     [1, L]  long   sequences end to end (prompt + response + end-of-turn each)
    position_ids  [1, L]  long   0, 1, … restarting at every sequence
    counted       [N]     long   flat indices of the positions whose next token is a response token
    labels        [N]     long   that next token

The model must treat packed sequences independently: transformers does for ``position_ids``
with no attention mask and no cache (tests/test_engine.py checks packed == per-sequence hidden
states).

``collate`` (and ``Batch.padded()``) lays the same examples out right-padded: the dense
reference the start-up check compares against, also used by the benchmarks. Padded shapes
(B = batch, T = longest sequence in the batch)::

  input_ids  [B, T]  long   prompt + response + end-of-turn, right-padded
  attention  [B, T]  long   1 on real tokens
  labels     [B, T]  long   labels[:, i] = input_ids[:, i + 1] (the token position i predicts)
  loss_mask  [B, T]  bool   True where labels[:, i] is a response token (end-of-turn included,
                            so students learn when to stop)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as the teacher was trained to see it; plain text if it has no chat template.
    ``system``: None keeps the template's default system turn (SmolLM2 adds a 20-token one);
    a string (``""`` included) is given as the system message instead."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def end_of_turn(tokenizer) -> str:
    return tokenizer.eos_token or ""


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int  # tokens before the response


def encode(tokenizer, prompt: str, response: str, max_prompt_tokens: int, max_tokens: int,
           system: str | None = None, example_id: str | None = None) -> Encoded:
    """Prompt tokens (left-truncated to keep the instruction's end and the template) + response.
    A response of which no token fits (``max_prompt_tokens >= max_tokens``, or an empty
    tokenisation) is an error naming the example: it would train on nothing."""
    p_ids = tokenizer(chat_prompt(tokenizer, prompt, system), add_special_tokens=False).input_ids
    if len(p_ids) > max_prompt_tokens:
        p_ids = p_ids[-max_prompt_tokens:]
    r_ids = tokenizer(response + end_of_turn(tokenizer), add_special_tokens=False).input_ids
    ids = (p_ids + r_ids)[:max_tokens]
    if len(ids) <= len(p_ids):
        which = f"example {example_id}" if example_id else "an example"
        raise ValueError(f"{which} keeps no response token: its prompt fills all {max_tokens} tokens "
                         f"(max_prompt_tokens {max_prompt_tokens} >= max_tokens {max_tokens}?) or the response is empty")
    return Encoded(ids, len(p_ids))


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(e.ids) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        labels[i, : n - 1] = ids[1:]
        # position j predicts token j+1; the response starts at token n_prompt
        loss_mask[i, max(e.n_prompt - 1, 0): n - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "loss_mask": loss_mask}


def counted_span(e: Encoded) -> range:
    """Positions of ``e.ids`` whose next token is a response token (end-of-turn included)."""
    return range(max(e.n_prompt - 1, 0), len(e.ids) - 1)


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    counted: torch.Tensor
    labels: torch.Tensor
    example_ids: list[str]
    encoded: list[Encoded] = field(repr=False)
    pad_id: int = 0

    @property
    def n_tokens(self) -> int:
        """Real tokens through the model (what ``runs.train_tokens_per_s`` counts)."""
        return int(self.input_ids.numel())

    @property
    def n_counted(self) -> int:
        return int(self.counted.numel())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.counted.to(device),
                     self.labels.to(device), self.example_ids, self.encoded, self.pad_id)

    def padded(self) -> dict[str, torch.Tensor]:
        """The same examples right-padded (:func:`collate`)."""
        return collate(self.encoded, self.pad_id)


def pack(encoded: Sequence[Encoded], example_ids: Sequence[str], pad_id: int = 0) -> Batch:
    """One packed row of ``encoded`` (see the module docstring)."""
    ids: list[int] = []
    pos: list[int] = []
    counted: list[int] = []
    labels: list[int] = []
    for e in encoded:
        offset = len(ids)
        ids += e.ids
        pos += range(len(e.ids))
        span = counted_span(e)
        counted += (offset + i for i in span)
        labels += (e.ids[i + 1] for i in span)
    return Batch(torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long),
                 torch.tensor(counted, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                 list(example_ids), list(encoded), pad_id)


def batches(encoded: Sequence[Encoded], batch_size: int, seed: int, pad_id: int) -> Iterator[dict]:
    """Endless shuffled batches; epoch k's order is fixed by (seed, k), the same for every
    objective, so runs differ only in the loss. (Padded; training packs: kdbench/engine/batches.py.)"""
    if len(encoded) < batch_size:
        raise ValueError(f"{len(encoded)} training examples are fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        order = list(range(len(encoded)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([encoded[i] for i in order[start:start + batch_size]], pad_id)
        epoch += 1
