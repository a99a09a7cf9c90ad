"""The evaluation protocol: decode responses (sampled over seeds and/or greedy) and score them
(metrics in kdbench/metrics/, applied per task kind in kdbench/evaluation/scoring.py).

The protocol (REFERENCE §3, fixed by the suite's EvalSpec): for each sampling seed, responses
to every test prompt are sampled with temperature 1, top-p 1, no top-k, cut at the end of
turn. Per sample we keep ROUGE-L (stemmed, max over references, × 100), length and whether it
is degenerate; per seed the mean ROUGE-L, Self-BLEU across prompts, distinct-1/2, mean length,
degenerate fraction and the teacher's mean log-likelihood of the sampled tokens; seed-free,
the Self-BLEU among one prompt's samples across seeds and the token-level forward / reverse
KL between teacher and student on the references. Exact-answer tasks add accuracy,
translation adds corpus BLEU / chrF; a task with ``greedy`` decoding (GSM8K, micro-task) is
scored on one greedy decode (metrics with seed NULL), as the paper does for GSM8K.

Without waste: prompts are tokenised once per task (:class:`TaskInputs`) and reused by every
seed, by the teacher's scoring and by the reference KL; generation is batched with left
padding and the KV cache, finished responses leaving the batch (kdbench/evaluation/decoder.py);
the teacher scores the **sampled token ids** themselves (never a decode → re-encode round trip)
through its prompt cache, in groups of similar length, and the reference KL runs only the
reference tokens through both prompt caches. The teacher's prompt cache is the same in every
run of a suite: the first evaluation stores it, later ones load it
(kdbench/evaluation/prompt_cache.py).

Memory is one batch of prompts (``EvalSpec.batch_size``), not one task: :func:`evaluate_model`
goes through a task chunk by chunk, and does with each chunk's prompt cache everything it is
needed for (every decode, the model's reference states) before dropping it; then the teacher's
prompt cache of the same chunk scores those decodes and the references, and is dropped in its
turn. Samples are keyed by example id (kdbench/evaluation/sampling.py), so the batch size
changes neither them nor, beyond float rounding, their scores: it is a performance knob.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from kdbench import metrics as M
from kdbench.data.batching import Encoded, chat_prompt, encode, pack
from kdbench.device import autocast_context
from kdbench.distributed import SINGLE, World, broadcast, gather
from kdbench.evaluation.decoder import Decoder, decode_texts
from kdbench.evaluation.sampling import HEAD_CHUNK
from kdbench.evaluation.scoring import headline_score, score_decode
from kdbench.modeling import final_hidden, head_params
from kdbench.registry import get_objective
from kdbench.suites import EvalSpec, TaskSpec

SCORE_TOKENS = 2048   # tokens per packed forward of the reference KL when no prompt cache serves it


@dataclass
class EvalResult:
    metrics: list[tuple[str, str, float, int | None]] = field(default_factory=list)  # (task, metric, value, seed)
    samples: list[dict] = field(default_factory=list)

    def mean(self, task: str, metric: str) -> float:
        vals = [v for t, m, v, s in self.metrics if t == task and m == metric]
        return statistics.fmean(vals) if vals else float("nan")


@dataclass
class TaskInputs:
    """A task's test examples, tokenised once: prompt ids (chat template, left-truncated to keep
    the instruction's end and the template) and the encoded references for the reference KL."""

    examples: list
    prompt_ids: list[list[int]]
    references: list[Encoded]

    @classmethod
    def build(cls, tokenizer, examples, max_prompt_tokens: int, max_tokens: int, system: str | None = None):
        prompts = [tokenizer(chat_prompt(tokenizer, e.prompt, system), add_special_tokens=False).input_ids[-max_prompt_tokens:]
                   for e in examples]
        refs = [encode(tokenizer, e.prompt, e.references[0], max_prompt_tokens, max_tokens, system) for e in examples]
        return cls(list(examples), prompts, refs)

    @property
    def keys(self) -> list[str]:
        """Each prompt's sampling key: its example's id (kdbench/evaluation/sampling.py)."""
        return [e.id for e in self.examples]


# ---------------------------------------------------------------------------- scoring through the head


def _packed(seqs: Sequence[Encoded]):
    """Packed batches of at most SCORE_TOKENS tokens (always at least one sequence)."""
    group: list[Encoded] = []
    size = 0
    for e in seqs:
        if group and size + len(e.ids) > SCORE_TOKENS:
            yield group
            group, size = [], 0
        group.append(e)
        size += len(e.ids)
    if group:
        yield group


def _rows_packed(model_or_source, refs: Sequence[Encoded], ids: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """Per reference, the final hidden states ``[n_response, d]`` at its response positions:
    from a teacher source (its cached rows) or a packed forward of the model."""
    out: list[torch.Tensor] = []
    at = 0
    for group in _packed(refs):
        batch = pack(group, list(ids[at:at + len(group)])).to(device)
        at += len(group)
        if isinstance(model_or_source, torch.nn.Module):
            with autocast_context(device, True):
                h = final_hidden(model_or_source, batch)
        else:
            h = model_or_source.hidden(batch)
        out += list(torch.split(h, [len(e.ids) - e.n_prompt for e in group]))
    return out


@torch.no_grad()
def reference_kl(student, teacher, refs: Sequence[Encoded], device: torch.device,
                 ref_ids: Sequence[str] | None = None, *, student_decoder: Decoder | None = None,
                 teacher_decoder: Decoder | None = None) -> tuple[float, float]:
    """Token-level forward and reverse KL(teacher, student) on the references' response tokens.

    ``teacher`` is a model, or a teacher source (``.hidden(batch)``, ``.head``) that serves its
    hidden states for ``ref_ids`` (the suite's cached teacher on the test references). A
    :class:`Decoder` of a side whose prompts are the references' prompts reuses its prompt
    cache (only the response tokens are run); otherwise that side runs packed sequences."""
    h_s = reference_hidden(student, refs, device, ref_ids, decoder=student_decoder)
    h_t = reference_hidden(teacher, refs, device, ref_ids, decoder=teacher_decoder)
    return kl_from_hidden(h_s, student, h_t, teacher)


@torch.no_grad()
def reference_hidden(model_or_source, refs: Sequence[Encoded], device: torch.device,
                     ref_ids: Sequence[str] | None = None, *, decoder: Decoder | None = None) -> torch.Tensor:
    """``[n, d]``: the final hidden states predicting the references' response tokens, in order:
    through ``decoder``'s prompt cache when it serves exactly these prompts, else from packed
    sequences (a model) or the cached rows (a teacher source)."""
    prompts = [e.ids[:e.n_prompt] for e in refs]
    if decoder is not None and decoder.serves(prompts) and isinstance(model_or_source, torch.nn.Module):
        return torch.cat(decoder.hidden([e.ids[e.n_prompt:] for e in refs]))
    ids = list(ref_ids) if ref_ids is not None else [str(i) for i in range(len(refs))]
    return torch.cat(_rows_packed(model_or_source, refs, ids, device))


@torch.no_grad()
def _reference_rows(model_or_source, refs: Sequence[Encoded], ref_ids: Sequence[str], device: torch.device,
                    chunk=None) -> torch.Tensor:
    """:func:`reference_hidden` of one batch of prompts: through ``chunk`` (a
    :class:`~kdbench.evaluation.decoder.Chunk` of exactly these prompts) or packed sequences."""
    if chunk is not None and isinstance(model_or_source, torch.nn.Module):
        return torch.cat(chunk.hidden([e.ids[e.n_prompt:] for e in refs]))
    return torch.cat(_rows_packed(model_or_source, refs, list(ref_ids), device))


@torch.no_grad()
def kl_from_hidden(h_s: torch.Tensor, head_s, h_t: torch.Tensor, head_t) -> tuple[float, float]:
    """Mean token-level KL(teacher‖student) and KL(student‖teacher) over the rows of ``h_s`` /
    ``h_t`` (``[n, d]`` each, row-aligned): the ``kl`` and ``rkl`` objectives' own per-position
    values on logits made through each head (weight and bias) in float32, one chunk of rows at a
    time. ``head_s`` / ``head_t``: a model, a teacher source or a head
    (:func:`kdbench.modeling.head_params`)."""
    fkl, rkl, n = kl_sums(h_s, head_s, h_t, head_t)
    return fkl / max(n, 1), rkl / max(n, 1)


@torch.no_grad()
def kl_sums(h_s: torch.Tensor, head_s, h_t: torch.Tensor, head_t) -> tuple[float, float, int]:
    """The sums behind :func:`kl_from_hidden` and their number of rows, so that the KL of a task
    can be gathered one batch of prompts at a time. Each row's KL is the objective's (float32);
    the rows are summed in float64, so the total does not drift with the number of rows."""
    forward, reverse = get_objective("kl"), get_objective("rkl")
    ws, bs = head_params(head_s, torch.float32)
    wt, bt = head_params(head_t, torch.float32)
    fkl = rkl = 0.0
    for a in range(0, h_s.shape[0], HEAD_CHUNK):
        s = F.linear(h_s[a:a + HEAD_CHUNK].float(), ws, bs)
        t = F.linear(h_t[a:a + HEAD_CHUNK].float(), wt, bt)
        fkl += float(forward.per_position(s, t)[0].sum(dtype=torch.float64))
        rkl += float(reverse.per_position(s, t)[0].sum(dtype=torch.float64))
    return fkl, rkl, h_s.shape[0]


# ---------------------------------------------------------------------------- one model on one task


def as_task(task) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec(str(task), source="test")


def evaluate_model(model, *, teacher, tokenizer, inputs: TaskInputs, task, spec: EvalSpec, device: torch.device,
                   is_teacher: bool = False, teacher_refs=None, teacher_prompts=None,
                   world: World = SINGLE) -> EvalResult | None:
    """Decode, score and collect everything the store keeps for one model on one task.

    ``teacher`` scores the samples (the prompts' cache shared with the decode when the model is
    the teacher); ``teacher_refs``, a teacher source serving the test references (the suite's
    cached teacher), replaces a teacher forward in the reference KL; ``teacher_prompts``, a
    :class:`kdbench.evaluation.prompt_cache.PromptCache`, serves the teacher's prompt cache from
    disk instead of a prefill (the same tensors). The headline decode is
    the greedy one when ``task.greedy`` (samples with seed NULL), else the sampled one; metrics
    of the sampled decode that the greedy decode also reports get the suffix ``_sampled``, and
    so do the sampled decode's per-sample score names.

    On several processes (``world``) each rank decodes and scores its share of the chunks
    (chunk i on rank i mod world size) and rank 0 gathers them in chunk order, scores the task
    and returns the result (None on the others): every draw is keyed per prompt and the KL sums
    are added in chunk order as one process adds them, so the result is the one process's, with
    every prompt once."""
    task = as_task(task)
    examples, refs, keys = inputs.examples, inputs.references, inputs.keys
    new_tokens = task.max_new_tokens or spec.max_new_tokens
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    scores_self = is_teacher or model is teacher
    decoder = Decoder(model, inputs.prompt_ids, spec, device, pad_id=pad, keys=keys,
                      stored=teacher_prompts if scores_self else None)
    scorer = decoder if scores_self else Decoder(teacher, inputs.prompt_ids, spec, device, pad_id=pad, keys=keys,
                                                 stored=teacher_prompts)
    seeds = list(task.seeds or spec.seeds) if task.sample else []
    decodes = ([(None, True)] if task.greedy else []) + [(seed, False) for seed in seeds]
    # The references' states come through a decoder's prompt cache when its prompts are the
    # references' prompts (only the response tokens are run), else from packed sequences.
    ref_prompts = [e.ids[:e.n_prompt] for e in refs]
    model_serves = decoder.serves(ref_prompts)
    teacher_side = teacher_refs or teacher
    teacher_serves = teacher_refs is None and scorer.serves(ref_prompts)

    # Chunk by chunk (one batch of prompts), in prompt order:
    # 1. the model's decodes of the chunk, as token ids: greedy (seed None) and / or one per
    #    sampling seed, each draw keyed by (seed, example id, position), so a decode does not
    #    depend on the chunks or decodes before it;
    # 2. the model's side of the reference KL while its prompt cache exists; then that cache goes,
    #    so it never coexists with the teacher's (on micro in float32: ~330 + ~410 MB);
    # 3. the teacher scores the chunk's decodes and its side of the reference KL through its own
    #    prompt cache of the chunk, which goes in its turn.
    # The lists gathered are those a loop over the whole task gives, in the same order.
    # Each chunk's results: {chunk index: (decodes' ids, their teacher log-probs, KL sums)}.
    done: dict[int, tuple] = {}
    for chunk in decoder.each(range(world.rank, len(decoder.chunks), world.size)):
        a, b = chunk.start, chunk.end
        decoded = [chunk.generate(seed, eos_id=eos, greedy=greedy, max_new_tokens=new_tokens)
                   for seed, greedy in decodes]
        h_model = None if is_teacher else _reference_rows(model, refs[a:b], keys[a:b], device,
                                                          chunk if model_serves else None)
        if scores_self:
            scoring = chunk
        else:
            chunk.release()
            scoring = scorer.chunk(chunk.index)
        scored = [scoring.logprobs(d) for d in decoded]
        kl = (0.0, 0.0, 0)
        if not is_teacher:
            h_teacher = _reference_rows(teacher_side, refs[a:b], keys[a:b], device,
                                        scoring if teacher_serves else None)
            kl = kl_sums(h_model, model, h_teacher, teacher_side)
            del h_model, h_teacher
        scoring.release()
        done[chunk.index] = (decoded, scored, kl)
    shares = gather(world, done)  # every rank's chunks on rank 0
    if shares is None:
        return None
    done = {i: part for share in shares for i, part in share.items()}
    ids: list[list[list[int]]] = [[] for _ in decodes]
    logprobs: list[list[float]] = [[] for _ in decodes]
    fkl_sum = rkl_sum = 0.0
    kl_rows = 0
    for i in range(len(decoder.chunks)):  # in prompt order, the sums added as one process adds them
        decoded, scored, (f, r, n) = done[i]
        for k in range(len(decodes)):
            ids[k] += decoded[k]
            logprobs[k] += scored[k]
        fkl_sum, rkl_sum, kl_rows = fkl_sum + f, rkl_sum + r, kl_rows + n

    result = EvalResult()
    greedy_names: set[str] = set()
    by_prompt: dict[str, list[str]] = {e.id: [] for e in examples}
    for (seed, greedy), decoded, lps in zip(decodes, ids, logprobs):
        outputs = decode_texts(tokenizer, decoded)
        per, mets = score_decode(task, examples, outputs)
        mets["teacher_logprob"] = statistics.fmean(lps)
        suffix = "_sampled" if task.greedy and not greedy else ""  # sample scores named like their metrics
        for e, o, s, lp in zip(examples, outputs, per, lps):
            scores = {k + suffix: v for k, v in {**s, "teacher_logprob": lp}.items() if not _nan(v)}
            result.samples.append({"task": task.name, "prompt_id": e.id, "seed": seed, "prompt": e.prompt,
                                   "output": o, "reference": list(e.references), "scores": scores})
        if greedy:
            greedy_names = set(mets)
            result.metrics += [(task.name, m, v, None) for m, v in mets.items()]
            continue
        for e, o in zip(examples, outputs):
            by_prompt[e.id].append(o)
        mets.update(self_bleu=M.self_bleu_across_prompts(outputs), distinct_1=M.distinct_n(outputs, 1),
                    distinct_2=M.distinct_n(outputs, 2))
        result.metrics += [(task.name, m + "_sampled" if m in greedy_names else m, v, seed)
                           for m, v in mets.items() if not (greedy_names and m.startswith("accuracy_"))]
    if len(seeds) > 1:
        result.metrics.append((task.name, "self_bleu_across_seeds", M.self_bleu_per_prompt(by_prompt), None))
    fkl, rkl = fkl_sum / max(kl_rows, 1), rkl_sum / max(kl_rows, 1)  # the teacher's own rows: 0
    result.metrics += [(task.name, "fkl_tok", fkl, None), (task.name, "rkl_tok", rkl, None)]
    # Undefined values (Self-BLEU of a single response, ...) are left out rather than stored as NaN.
    result.metrics = [m for m in result.metrics if not math.isnan(m[2])]
    return result


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def validation_score(model, tokenizer, inputs: TaskInputs, spec: EvalSpec, device: torch.device, seed: int = 1,
                     task=None, world: World = SINGLE) -> float:
    """The checkpoint-selection score: the validation task's headline metric (ROUGE-L for open
    tasks, accuracy for exact ones, BLEU for translation) of one decode per validation prompt --
    greedy when the task's headline decode is greedy, else sampled with ``seed``. On several
    processes each decodes its share of the chunks (as :func:`evaluate_model`), rank 0 scores
    them all and every rank returns its score: the one process's, on every rank."""
    task = as_task(task or "valid")
    decoder = Decoder(model, inputs.prompt_ids, spec, device, pad_id=tokenizer.pad_token_id, keys=inputs.keys)
    mine = {c.index: c.generate(None if task.greedy else seed, eos_id=tokenizer.eos_token_id, greedy=task.greedy,
                                max_new_tokens=task.max_new_tokens or spec.max_new_tokens)
            for c in decoder.each(range(world.rank, len(decoder.chunks), world.size))}
    shares = gather(world, mine)
    score = None
    if shares is not None:
        done = {i: part for share in shares for i, part in share.items()}
        ids = [r for i in range(len(decoder.chunks)) for r in done[i]]
        score = headline_score(task, inputs.examples, decode_texts(tokenizer, ids))
    return broadcast(world, score)
