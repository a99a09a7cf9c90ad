"""Batched decoding with the KV cache: prompts processed once, finished responses leave the batch.

Evaluation decodes the same prompts under several sampling seeds and then lets the teacher
score what was sampled. Three things keep that cheap:

* **a prompt is processed once** (:func:`prefill`): its KV cache is copied for every seed's
  decode and, for the teacher, for the scoring of every seed's responses;
* **finished responses leave the batch**: a row that emitted end-of-turn is dropped from the
  batch and from the cache (``Cache.batch_select_indices``), so the work follows the tokens
  actually generated — ``model.generate`` computes every row until the longest ends;
* logits come from the final hidden states through the head in float32, the same map the
  training path uses (kdbench/modeling.py).

Decoding follows the paper's protocol knobs with transformers' semantics: temperature, then
top-k (0: off), then top-p (1.0: off) (:func:`_filter`), then a keyed inverse-CDF draw, or
greedy argmax. Prompts are left-padded; positions count real tokens only, so a prompt's
continuation does not depend on what it is batched with (up to float rounding).

**Keyed draws: a sample depends on its prompt, never on its batch or device.** The token at
position ``t`` of the response to a prompt is picked by its own uniform ``u(seed, key, t)``:
the ``t``-th float32 of a CPU ``torch.Generator`` seeded from a digest of (sampling seed,
prompt key) (:func:`draw_uniforms`; a position's uniform does not depend on how many are
drawn). The key is the prompt's example id, or a digest of its token ids where it has none
(:func:`prompt_key`). The token is the first index whose cumulative probability exceeds ``u``
(:func:`pick_tokens`: a float32 cumsum of the filtered distribution on the model's device and a
``searchsorted``). So the same seed gives the same samples whatever the batch size, the
chunking, the order of prompts or the device, up to the logits' rounding moving a CDF
boundary across ``u`` (tests/test_eval_sampling.py). A generator shared by a batch (the draw
of ``torch.multinomial``) would tie each sample to everything decoded before it.

**The sampler for on-policy training** is :func:`decode`: ``decode(model.eval(), prompts,
seed=s, keys=ids, max_new_tokens=..., eos_id=..., pad_id=..., device=...)`` gives one response
per prompt, the same ones whatever ``batch_size`` it runs at. A trainer draws its student's
responses with a fresh (seed, key) per draw — e.g. the run's seed and ``f"{example_id}@{step}"``
— so a resumed run draws the same responses from its cursor alone, with no generator state to
save. Evaluation draws through :class:`kdbench.evaluation.decoder.Decoder`, which keys every
prompt by its example id.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kdbench.modeling import head_params

HEAD_CHUNK = 256  # positions per float32 head chunk when scoring (256 × 49,152 logits: 50 MB)


@dataclass
class Prefix:
    """Prompts already run through a model: its cache and each prompt's last hidden state."""

    cache: object                  # transformers Cache of the prompts (left-padded)
    last_hidden: torch.Tensor      # [n, d] final hidden state at each prompt's last token
    mask: torch.Tensor             # [n, width] 1 on real prompt tokens
    next_pos: torch.Tensor         # [n] position of the first generated token

    def copy(self) -> "Prefix":
        return Prefix(cache_copy(self.cache), self.last_hidden, self.mask, self.next_pos)


def cache_copy(cache, rows: torch.Tensor | None = None):
    """A cache that can be extended without touching ``cache`` (optionally only ``rows`` of it).

    transformers' dynamic layers never write into their tensors (``update`` concatenates,
    ``batch_select_indices`` indexes: both make new tensors), so copying the layer objects is
    enough and the prompt's keys and values are shared, not duplicated; other cache kinds are
    deep-copied."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]
    else:
        out = copy.deepcopy(cache)
    if rows is not None:
        out.batch_select_indices(rows)
    return out


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


def prompt_key(prompt: Sequence[int]) -> str:
    """The sampling key of a prompt without an example id: a digest of its token ids (so equal
    prompts draw equal samples; prompts with ids are keyed by them)."""
    return "ids:" + hashlib.sha256(",".join(str(int(t)) for t in prompt).encode()).hexdigest()[:32]


def _stream_seed(seed: int, key: str) -> int:
    """The CPU generator seed of (sampling seed, prompt key): 63 bits of a sha256, so streams of
    different keys or seeds are unrelated."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()[:8], "little") >> 1


def draw_uniforms(seed: int, keys: Sequence[str], n: int) -> torch.Tensor:
    """``[len(keys), n]`` float32 uniforms in [0, 1) on the CPU: row ``i``, column ``t`` is the
    uniform of position ``t`` of the response to the prompt keyed ``keys[i]`` under ``seed``.
    Each row comes from its own ``torch.Generator`` (seeded by :func:`_stream_seed`), whose
    float32 stream is a prefix-stable sequence: column ``t`` is the same whatever ``n``."""
    out = torch.empty((len(keys), n), dtype=torch.float32)
    for i, key in enumerate(keys):
        out[i] = torch.rand(n, generator=torch.Generator().manual_seed(_stream_seed(seed, str(key))))
    return out


def pick_tokens(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The inverse-CDF draw: per row of ``logits`` (``[n, V]``, the filtered float32 logits,
    masked entries -inf), the first index whose cumulative probability exceeds the row's
    uniform ``u`` (``[n]`` in [0, 1), any device). The cumsum is of unnormalised weights, so the
    threshold is ``u`` × their total; that product can round up to the total itself, which no
    index exceeds: the pick is then the last token with weight, never a masked one. A masked
    token adds nothing to the cumsum, so it is never the first to exceed the threshold."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    cdf = weights.cumsum(-1)
    threshold = u.to(device=cdf.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    last = (weights > 0).cumsum(-1).argmax(-1)  # argmax takes the first maximum: the last weighted token
    return torch.minimum(tok, last)


@torch.no_grad()
def decode_from(model, prefix: Prefix, *, max_new_tokens: int, eos_id: int, greedy: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                uniforms: torch.Tensor | None = None) -> list[list[int]]:
    """One response per prompt of ``prefix`` (consumed: pass ``prefix.copy()`` to reuse it),
    token ids cut after the first ``eos_id`` (kept). Sampling picks the token at position ``t``
    of row ``i`` with ``uniforms[i, t]`` (:func:`draw_uniforms`, ``[n, max_new_tokens]``);
    greedy takes the argmax and needs none."""
    w, b = head_params(model, torch.float32)  # made once per call, not once per token
    cache, hidden, mask, next_pos = prefix.cache, prefix.last_hidden, prefix.mask, prefix.next_pos
    n = hidden.shape[0]
    if not greedy:
        if uniforms is None or tuple(uniforms.shape) != (n, max_new_tokens):
            raise ValueError(f"sampling {n} prompts needs uniforms of shape ({n}, {max_new_tokens}) "
                             f"(draw_uniforms), got {None if uniforms is None else tuple(uniforms.shape)}")
        u = uniforms.to(hidden.device)  # one copy per decode, not one per token
    alive = torch.arange(n, device=hidden.device)
    responses: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_new_tokens):
        logits = F.linear(hidden.float(), w, b)
        if greedy:
            tok = logits.argmax(-1)
        else:
            tok = pick_tokens(_filter(logits, temperature, top_k, top_p), u[:, t])
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
            if not greedy:
                u = u[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model.base_model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               cache=cache, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return responses


def decode(model, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
           seed: int | None = None, keys: Sequence[str] | None = None, greedy: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, device: torch.device | str = "cpu",
           batch_size: int | None = None) -> list[list[int]]:
    """One response per prompt: :func:`prefill` then :func:`decode_from`, ``batch_size`` prompts
    at a time (None, the default: all at once). Sampling needs ``seed``; the draws are keyed by
    ``keys`` (one per prompt; default: :func:`prompt_key` of each), so the responses do not
    depend on ``batch_size``. The sampler an on-policy trainer calls (module docstring)."""
    if not prompts:
        return []
    if not greedy and seed is None:
        raise ValueError("sampling needs a seed (the draws are keyed by seed, prompt key and position)")
    keys = [str(k) for k in keys] if keys is not None else [prompt_key(p) for p in prompts]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    step = batch_size or len(prompts)
    out: list[list[int]] = []
    for a in range(0, len(prompts), step):
        chunk = prompts[a:a + step]
        u = None if greedy else draw_uniforms(seed, keys[a:a + step], max_new_tokens)
        out += decode_from(model, prefill(model, chunk, pad_id=pad_id, device=device), max_new_tokens=max_new_tokens,
                           eos_id=eos_id, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                           uniforms=u)
    return out


def length_groups(lengths: Sequence[int], *, min_rows: int = 8, ratio: float = 0.75) -> list[list[int]]:
    """Indices grouped by similar length (longest first), so a right-padded forward per group
    wastes little on padding: a group closes when the next length falls below ``ratio`` × its
    longest and it already has ``min_rows`` rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (lengths[i] >= ratio * lengths[groups[-1][0]] or len(groups[-1]) < min_rows):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def continuation_hidden(model, prefix: Prefix, continuations: Sequence[list[int]], *, pad_id: int) -> list[torch.Tensor]:
    """For each continuation ``c`` of the prompts of ``prefix`` (not consumed), the final hidden
    states ``[len(c), d]`` whose row ``j`` predicts ``c[j]``: row 0 is the prompt's last hidden
    state, the rest come from forwards over ``c[:-1]`` with the prompt cache. Continuations
    are forwarded in groups of similar length (:func:`length_groups`), right-padded within a
    group, so the work follows the real tokens rather than the longest continuation."""
    device = prefix.last_hidden.device
    out = [prefix.last_hidden[i:i + min(1, len(c))] for i, c in enumerate(continuations)]  # empty: no rows
    todo = [i for i, c in enumerate(continuations) if len(c) > 1]
    for group in length_groups([len(continuations[i]) for i in todo]):
        rows = [todo[g] for g in group]
        width = len(continuations[rows[0]]) - 1
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            c = continuations[i]
            ids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            cmask[r, : len(c) - 1] = 1
        idx = torch.tensor(rows, device=device)
        ids, cmask = ids.to(device), cmask.to(device)
        mask = torch.cat([prefix.mask[idx], cmask], dim=1)
        positions = prefix.next_pos[idx, None] + torch.arange(width, device=device)[None]
        h = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=cache_copy(prefix.cache, idx), use_cache=True).last_hidden_state
        for r, i in enumerate(rows):
            out[i] = torch.cat([out[i], h[r, : len(continuations[i]) - 1]])
    return out


@torch.no_grad()
def continuation_logprobs(model, prefix: Prefix, continuations: Sequence[list[int]], *, pad_id: int) -> list[float]:
    """Mean per-token log-likelihood of each continuation given its prompt (the ``prefix``,
    not consumed), from :func:`continuation_hidden` through the head in float32."""
    w, b = head_params(model, torch.float32)  # made once per call, not once per token
    hidden = continuation_hidden(model, prefix, continuations, pad_id=pad_id)
    hs = torch.cat(hidden)
    targets = torch.cat([torch.tensor(c, dtype=torch.long) for c in continuations]).to(hs.device)
    lp = torch.cat([F.linear(hs[a:a + HEAD_CHUNK].float(), w, b).log_softmax(-1)
                    .gather(-1, targets[a:a + HEAD_CHUNK, None]).squeeze(-1) for a in range(0, hs.shape[0], HEAD_CHUNK)])
    out, at = [], 0
    for c in continuations:
        out.append(float(lp[at:at + len(c)].sum()) / len(c) if c else float("nan"))
        at += len(c)
    return out
