"""Batched decoding with the KV cache: prompts processed once, finished responses leave the batch.

Evaluation decodes the same prompts under several sampling seeds and then lets the teacher
score what was sampled. Three things keep that cheap:

* **a prompt is processed once** (:func:`prefill`): its KV cache is copied for every seed's
  decode and, for the teacher, for the scoring of every seed's responses;
* **finished responses leave the batch**: a row that emitted end-of-turn is dropped from the
  batch and from the cache (``Cache.batch_select_indices``), so the work follows the tokens
  actually generated — ``model.generate`` computes every row until the longest ends;
* logits come from the final hidden states through the head in float32, the same map the
  training path uses (kdbench/engine/forward.py).

Decoding follows the paper's protocol knobs with transformers' semantics: temperature, then
top-k (0: off), then top-p (1.0: off), then a draw with the global torch generator (seeded by
the caller), or greedy argmax. Prompts are left-padded; positions count real tokens only, so a
prompt's continuation does not depend on what it is batched with (up to float rounding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kdbench.engine.forward import output_head


@dataclass
class Prefix:
    """Prompts already run through a model: its cache and each prompt's last hidden state."""

    cache: object                  # transformers Cache of the prompts (left-padded)
    last_hidden: torch.Tensor      # [n, d] final hidden state at each prompt's last token
    mask: torch.Tensor             # [n, width] 1 on real prompt tokens
    next_pos: torch.Tensor         # [n] position of the first generated token

    def copy(self) -> "Prefix":
        return Prefix(copy.deepcopy(self.cache), self.last_hidden, self.mask, self.next_pos)


def head_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head in float32 (made once per call site, not once per token)."""
    head = output_head(model)
    bias = getattr(head, "bias", None)
    return head.weight.float(), None if bias is None else bias.float()


@torch.no_grad()
def prefill(model, prompts: Sequence[list[int]], *, pad_id: int, device: torch.device | str = "cpu") -> Prefix:
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return Prefix(out.cache, out.last_hidden_state[:, -1], mask, positions[:, -1] + 1)


def _filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with the sampling protocol applied (float32; masked entries -inf)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p_sorted = sorted_logits.softmax(-1)
        remove = p_sorted.cumsum(-1) - p_sorted > top_p  # keep the smallest top set whose mass reaches top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@torch.no_grad()
def decode_from(model, prefix: Prefix, *, max_new_tokens: int, eos_id: int, greedy: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
    """One response per prompt of ``prefix`` (consumed: pass ``prefix.copy()`` to reuse it),
    token ids cut after the first ``eos_id`` (kept)."""
    w, b = head_weights(model)
    cache, hidden, mask, next_pos = prefix.cache, prefix.last_hidden, prefix.mask, prefix.next_pos
    n = hidden.shape[0]
    alive = torch.arange(n, device=hidden.device)
    responses: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_new_tokens):
        logits = F.linear(hidden.float(), w, b)
        if greedy:
            tok = logits.argmax(-1)
        else:
            tok = torch.multinomial(_filter(logits, temperature, top_k, top_p).softmax(-1), 1).squeeze(-1)
        for row, token in zip(alive.tolist(), tok.tolist()):
            responses[row].append(token)
        if t == max_new_tokens - 1:
            break
        keep = tok != eos_id
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            cache.batch_select_indices(idx)
            alive, tok, mask, next_pos = alive[idx], tok[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model.base_model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               cache=cache, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return responses


def decode(model, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
           greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           device: torch.device | str = "cpu") -> list[list[int]]:
    """:func:`prefill` then :func:`decode_from` (one use of the prompts)."""
    if not prompts:
        return []
    return decode_from(model, prefill(model, prompts, pad_id=pad_id, device=device), max_new_tokens=max_new_tokens,
                       eos_id=eos_id, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)


@torch.no_grad()
def continuation_logprobs(model, prefix: Prefix, continuations: Sequence[list[int]], *, pad_id: int) -> list[float]:
    """Mean per-token log-likelihood of each continuation given its prompt (the ``prefix``,
    copied, not consumed): the first token is scored from the prompt's last hidden state, the
    rest from one forward over the right-padded continuations with the prompt cache."""
    w, b = head_weights(model)
    n = len(continuations)
    longest = max(len(c) for c in continuations)
    first = F.linear(prefix.last_hidden.float(), w, b).log_softmax(-1)
    totals = [float(first[i, c[0]]) for i, c in enumerate(continuations)]
    if longest > 1:
        device = prefix.last_hidden.device
        ids = torch.full((n, longest - 1), pad_id, dtype=torch.long)
        cmask = torch.zeros((n, longest - 1), dtype=torch.long)
        for i, c in enumerate(continuations):
            if len(c) > 1:
                ids[i, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                cmask[i, : len(c) - 1] = 1
        ids, cmask = ids.to(device), cmask.to(device)
        mask = torch.cat([prefix.mask, cmask], dim=1)
        positions = prefix.next_pos[:, None] + torch.arange(longest - 1, device=device)[None]
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=copy.deepcopy(prefix.cache), use_cache=True)
        h = out.last_hidden_state  # [n, longest - 1, d]: position j predicts continuation token j + 1
        rows = cmask.reshape(-1).nonzero().squeeze(-1)
        targets = torch.cat([torch.tensor(c[1:], dtype=torch.long) for c in continuations if len(c) > 1]).to(device)
        hs = h.reshape(-1, h.shape[-1]).index_select(0, rows)
        lp = torch.cat([F.linear(hs[a:a + 256].float(), w, b).log_softmax(-1)
                        .gather(-1, targets[a:a + 256, None]).squeeze(-1) for a in range(0, hs.shape[0], 256)])
        at = 0
        for i, c in enumerate(continuations):  # rows are in (continuation, position) order
            k = len(c) - 1
            if k > 0:
                totals[i] += float(lp[at:at + k].sum())
                at += k
    return [t / len(c) for t, c in zip(totals, continuations)]
