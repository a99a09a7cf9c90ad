"""A model over one task's prompts, one batch of prompts at a time: decode under seeds (or
greedy), score continuations.

:class:`Decoder` cuts a task's prompts into batches of ``EvalSpec.batch_size`` (chunks, in
prompt order). A chunk's prompts are run through the model once
(:func:`kdbench.evaluation.sampling.prefill`) and that prefix serves every seed's decode of the
chunk and the scoring of responses to it (their log-likelihood, their hidden states); then it
is dropped, before the next chunk's is made. :meth:`Decoder.each` hands out the chunks so, and
the protocol (kdbench/evaluation/protocol.py) does everything a chunk's prefix is needed for
while it exists: evaluation memory is one chunk's KV cache, whatever the number of prompts
(GPT-2 XL on S-NI's 1,694 prompts would need ~130 GB to keep every chunk's). The whole-task
methods (:meth:`Decoder.generate`, :meth:`Decoder.logprobs`, :meth:`Decoder.hidden`) go chunk by
chunk the same way and make the prefixes again on each call.

Samples are keyed by each prompt's example id (``keys``; kdbench/evaluation/sampling.py), so
the batch size is a performance knob: it changes neither the samples nor their scores beyond
float rounding. An on-policy batch source can draw its responses here or through
:func:`kdbench.evaluation.sampling.decode` (in eval mode: transformers' activation
checkpointing turns the KV cache off in training mode). A stored prefill
(:class:`kdbench.evaluation.prompt_cache.PromptCache`, one file per chunk) replaces the
computed one bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from kdbench.device import autocast_context
from kdbench.evaluation.sampling import (Prefix, continuation_hidden, continuation_logprobs, decode_from,
                                         draw_uniforms, prefill, prompt_key)
from kdbench.suites import EvalSpec


class Decoder:
    """One model over one task's prompts, cut into chunks of ``spec.batch_size`` in prompt order.
    ``keys``: one sampling key per prompt (its example id; default: a digest of its token ids);
    ``stored``: a :class:`~kdbench.evaluation.prompt_cache.PromptCache` of this model on these
    prompts and chunks, read chunk by chunk instead of prefilling."""

    def __init__(self, model, prompt_ids: Sequence[list[int]], spec: EvalSpec, device: torch.device, *, pad_id: int,
                 keys: Sequence[str] | None = None, stored=None):
        self.model, self.spec, self.device, self.pad_id = model.eval(), spec, device, pad_id
        prompts = [list(p) for p in prompt_ids]
        keys = [str(k) for k in keys] if keys is not None else [prompt_key(p) for p in prompts]
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} sampling keys for {len(prompts)} prompts")
        size = spec.batch_size
        self.chunks = [prompts[a:a + size] for a in range(0, len(prompts), size)]
        self.keys = [keys[a:a + size] for a in range(0, len(keys), size)]
        self.starts = [a for a in range(0, len(prompts), size)]
        self.stored = stored

    def prefix(self, i: int) -> Prefix:
        """Chunk ``i``'s prompts run through the model, or read from the stored prefill; not kept
        here (the caller drops it when done)."""
        if self.stored is not None:
            return self.stored.prefix(i, self._prefill, self.device, getattr(self.model, "config", None),
                                      batches=len(self.chunks))
        return self._prefill(i)

    def _prefill(self, i: int) -> Prefix:
        with autocast_context(self.device, True):
            return prefill(self.model, self.chunks[i], pad_id=self.pad_id, device=self.device)

    def chunk(self, i: int) -> "Chunk":
        """Chunk ``i`` with its prefix made (:meth:`prefix`)."""
        return Chunk(self, i, self.prefix(i))

    def each(self, indices: Sequence[int] | None = None) -> Iterator["Chunk"]:
        """The chunks in prompt order (or those of ``indices``: a rank's share), each with its
        prefix; a chunk's prefix is released when the loop moves on, before the next one is made,
        so one is resident at a time."""
        for i in range(len(self.chunks)) if indices is None else indices:
            chunk = self.chunk(i)
            try:
                yield chunk
            finally:
                chunk.release()

    def generate(self, seed: int | None, *, eos_id: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """One response per prompt as token ids, cut after the first end-of-turn (kept): sampled
        with the spec's protocol under ``seed`` (keyed per prompt), or greedy."""
        return [r for c in self.each() for r in c.generate(seed, eos_id=eos_id, greedy=greedy,
                                                            max_new_tokens=max_new_tokens)]

    def logprobs(self, responses: Sequence[list[int]]) -> list[float]:
        """This model's mean per-token log-likelihood of each response given its prompt."""
        return [v for c in self.each() for v in c.logprobs(responses[c.start:c.end])]

    def hidden(self, continuations: Sequence[list[int]]) -> list[torch.Tensor]:
        """``[len(c), d]`` final hidden states predicting each token of each continuation."""
        return [h for c in self.each() for h in c.hidden(continuations[c.start:c.end])]

    def serves(self, prompt_ids: Sequence[list[int]]) -> bool:
        """Whether these are exactly this decoder's prompts (so its prefixes can serve them)."""
        return [p for c in self.chunks for p in c] == [list(p) for p in prompt_ids]


@dataclass(eq=False)
class Chunk:
    """One batch of a :class:`Decoder`'s prompts with its prefix: every decode and score of these
    prompts runs through it until :meth:`release`."""

    decoder: Decoder
    index: int
    prefix: Prefix | None

    @property
    def start(self) -> int:
        """Index of the chunk's first prompt in the task."""
        return self.decoder.starts[self.index]

    @property
    def end(self) -> int:
        return self.start + len(self.decoder.chunks[self.index])

    @property
    def keys(self) -> list[str]:
        return self.decoder.keys[self.index]

    def release(self) -> None:
        """Drop the prefix (a float32 student's on micro's 193 prompts: ~330 MB)."""
        self.prefix = None

    def _live(self) -> Prefix:
        if self.prefix is None:
            raise RuntimeError(f"chunk {self.index}'s prefix was released")
        return self.prefix

    def generate(self, seed: int | None, *, eos_id: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """One response per prompt of the chunk (:meth:`Decoder.generate`)."""
        d = self.decoder
        n = max_new_tokens or d.spec.max_new_tokens
        if not greedy and seed is None:
            raise ValueError("sampling needs a seed (greedy=True decodes without one)")
        uniforms = None if greedy else draw_uniforms(seed, self.keys, n)
        with autocast_context(d.device, True):
            return decode_from(d.model, self._live().copy(), max_new_tokens=n, eos_id=eos_id, greedy=greedy,
                               temperature=d.spec.temperature, top_k=d.spec.top_k, top_p=d.spec.top_p,
                               uniforms=uniforms)

    def logprobs(self, responses: Sequence[list[int]]) -> list[float]:
        """The model's mean per-token log-likelihood of each response to the chunk's prompts."""
        with autocast_context(self.decoder.device, True):
            return continuation_logprobs(self.decoder.model, self._live(), responses, pad_id=self.decoder.pad_id)

    def hidden(self, continuations: Sequence[list[int]]) -> list[torch.Tensor]:
        """``[len(c), d]`` final hidden states predicting each token of each continuation."""
        with autocast_context(self.decoder.device, True):
            return continuation_hidden(self.decoder.model, self._live(), continuations, pad_id=self.decoder.pad_id)


def generate_ids(model, prompt_ids: Sequence[list[int]], spec: EvalSpec, seed: int | None, device: torch.device,
                 *, eos_id: int, pad_id: int, greedy: bool = False, max_new_tokens: int | None = None,
                 keys: Sequence[str] | None = None) -> list[list[int]]:
    """One decode of ``prompt_ids`` (see :class:`Decoder`), its draws keyed by ``keys`` (the
    examples' ids; default: digests of the prompts)."""
    return Decoder(model, prompt_ids, spec, device, pad_id=pad_id, keys=keys).generate(
        seed, eos_id=eos_id, greedy=greedy, max_new_tokens=max_new_tokens)


def decode_texts(tokenizer, ids: Sequence[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
