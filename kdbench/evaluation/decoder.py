"""A model over one task's prompts: decode under seeds (or greedy), score continuations.

:class:`Decoder` runs each batch of prompts through the model once
(:func:`kdbench.evaluation.sampling.prefill`) and reuses that cache for every seed's decode
and for scoring responses (their log-likelihood, their hidden states). Evaluation decodes and
scores through it; an on-policy batch source can draw its responses through it too (it needs
the model in eval mode: transformers' activation checkpointing turns the KV cache off in
training mode). A stored prefill (:class:`kdbench.evaluation.prompt_cache.PromptCache`)
replaces the computed one bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kdbench.device import autocast_context
from kdbench.evaluation.sampling import continuation_hidden, continuation_logprobs, decode_from, prefill
from kdbench.suites import EvalSpec


class Decoder:
    """One model over one task's prompts: each batch of prompts is run through the model once
    (:func:`kdbench.evaluation.sampling.prefill`) and its cache reused by every seed's decode and by the
    scoring of responses. Batches are fixed by prompt order (EvalSpec.batch_size), so a seed
    gives the same samples for the same model whatever else runs."""

    def __init__(self, model, prompt_ids: Sequence[list[int]], spec: EvalSpec, device: torch.device, *, pad_id: int,
                 stored=None):
        self.model, self.spec, self.device, self.pad_id = model.eval(), spec, device, pad_id
        self.chunks = [list(prompt_ids[a:a + spec.batch_size]) for a in range(0, len(prompt_ids), spec.batch_size)]
        self.stored = stored  # a PromptCache (kdbench/evaluation/prompt_cache.py) of this model on these prompts
        self._prefixes = None

    @property
    def prefixes(self):
        if self._prefixes is None:
            self._prefixes = (self.stored.prefixes(self._prefill, self.device, getattr(self.model, "config", None))
                              if self.stored else self._prefill())
        return self._prefixes

    def _prefill(self) -> list:
        with autocast_context(self.device, True):
            return [prefill(self.model, c, pad_id=self.pad_id, device=self.device) for c in self.chunks]

    def release(self) -> None:
        """Drop the prompts' cache (a float32 student's on micro: ~330 MB); a later use
        prefills again, with the same result."""
        self._prefixes = None

    def generate(self, seed: int | None, *, eos_id: int, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """One response per prompt as token ids, cut after the first end-of-turn (kept): sampled
        with the spec's protocol under ``seed``, or greedy."""
        if seed is not None:
            torch.manual_seed(seed)
        out: list[list[int]] = []
        with autocast_context(self.device, True):
            for prefix in self.prefixes:
                out += decode_from(self.model, prefix.copy(), max_new_tokens=max_new_tokens or self.spec.max_new_tokens,
                                   eos_id=eos_id, greedy=greedy, temperature=self.spec.temperature,
                                   top_k=self.spec.top_k, top_p=self.spec.top_p)
        return out

    def logprobs(self, responses: Sequence[list[int]]) -> list[float]:
        """This model's mean per-token log-likelihood of each response given its prompt."""
        return self._per_chunk(continuation_logprobs, responses)

    def hidden(self, continuations: Sequence[list[int]]) -> list[torch.Tensor]:
        """``[len(c), d]`` final hidden states predicting each token of each continuation."""
        return self._per_chunk(continuation_hidden, continuations)

    def serves(self, prompt_ids: Sequence[list[int]]) -> bool:
        """Whether these are exactly this decoder's prompts (so its cache can be reused)."""
        return [p for c in self.chunks for p in c] == [list(p) for p in prompt_ids]

    def _per_chunk(self, fn, continuations):
        out: list = []
        at = 0
        with autocast_context(self.device, True):
            for prefix, chunk in zip(self.prefixes, self.chunks):
                out += fn(self.model, prefix, continuations[at:at + len(chunk)], pad_id=self.pad_id)
                at += len(chunk)
        return out


def generate_ids(model, prompt_ids: Sequence[list[int]], spec: EvalSpec, seed: int | None, device: torch.device,
                 *, eos_id: int, pad_id: int, greedy: bool = False, max_new_tokens: int | None = None) -> list[list[int]]:
    """One decode of ``prompt_ids`` (see :class:`Decoder`, which reuses the prompts' cache)."""
    return Decoder(model, prompt_ids, spec, device, pad_id=pad_id).generate(seed, eos_id=eos_id, greedy=greedy,
                                                                           max_new_tokens=max_new_tokens)


def decode_texts(tokenizer, ids: Sequence[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
