"""Evaluation: decode responses (sampled over seeds and/or greedy) and score them (metrics in
kdbench/metrics.py, applied per task kind in kdbench/scoring.py).

The protocol (REFERENCE §3, fixed by the suite's EvalSpec): for each sampling seed, responses
to every test prompt are sampled with temperature 1, top-p 1, no top-k, cut at the end of
turn. Per sample we keep ROUGE-L (stemmed, max over references, × 100), length and whether it
is degenerate; per seed the mean ROUGE-L, Self-BLEU across prompts, distinct-1/2, mean length,
degenerate fraction and the teacher's mean log-likelihood of the responses; seed-free, the
Self-BLEU among one prompt's samples across seeds and the token-level forward / reverse KL
between teacher and student on the references. Exact-answer tasks add accuracy, translation
adds corpus BLEU / chrF; a task with ``greedy`` decoding (GSM8K, micro-task) is scored on one
greedy decode (metrics with seed NULL), as the paper does for GSM8K.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kdbench import metrics as M
from kdbench.data.batching import chat_prompt, collate, encode
from kdbench.scoring import headline_score, score_decode
from kdbench.suites import EvalSpec, TaskSpec
from kdbench.train import autocast_context


@dataclass
class EvalResult:
    metrics: list[tuple[str, str, float, int | None]] = field(default_factory=list)  # (task, metric, value, seed)
    samples: list[dict] = field(default_factory=list)

    def mean(self, task: str, metric: str) -> float:
        vals = [v for t, m, v, s in self.metrics if t == task and m == metric]
        return statistics.fmean(vals) if vals else float("nan")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], spec: EvalSpec, seed: int | None, device: torch.device,
                     max_prompt_tokens: int, *, greedy: bool = False, max_new_tokens: int | None = None) -> list[str]:
    """One response per prompt: sampled with the spec's protocol under ``seed``, or greedy.
    Batches are fixed by prompt order, so a seed gives the same samples for the same model
    whatever else runs."""
    model.eval()
    tokenizer.padding_side = "left"
    if seed is not None:
        torch.manual_seed(seed)
    decoding = (dict(do_sample=False) if greedy else
                dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k))
    outputs: list[str] = []
    for start in range(0, len(prompts), spec.batch_size):
        chunk = [chat_prompt(tokenizer, p) for p in prompts[start:start + spec.batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens,
                        add_special_tokens=False).to(device)
        with autocast_context(device, True):
            out = model.generate(**enc, **decoding, max_new_tokens=max_new_tokens or spec.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


@torch.no_grad()
def response_logprob(teacher, tokenizer, prompts: Sequence[str], responses: Sequence[str], device: torch.device,
                     max_prompt_tokens: int, max_tokens: int, batch_size: int = 32) -> list[float]:
    """The teacher's mean per-token log-likelihood of each response (end-of-turn included)."""
    enc = [encode(tokenizer, p, r, max_prompt_tokens, max_tokens) for p, r in zip(prompts, responses)]
    out: list[float] = []
    for start in range(0, len(enc), batch_size):
        b = {k: v.to(device) for k, v in collate(enc[start:start + batch_size], tokenizer.pad_token_id).items()}
        with autocast_context(device, True):
            logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1)
        m = b["loss_mask"]
        out += ((logp * m).sum(1) / m.sum(1).clamp(min=1)).tolist()
    return out


@torch.no_grad()
def reference_kl(student, teacher, tokenizer, examples, device: torch.device, max_prompt_tokens: int,
                 max_tokens: int, batch_size: int = 16) -> tuple[float, float]:
    """Token-level forward and reverse KL(teacher, student) on the references' response tokens."""
    enc = [encode(tokenizer, e.prompt, e.references[0], max_prompt_tokens, max_tokens) for e in examples]
    fkl_sum = rkl_sum = 0.0
    n = 0
    for start in range(0, len(enc), batch_size):
        b = {k: v.to(device) for k, v in collate(enc[start:start + batch_size], tokenizer.pad_token_id).items()}
        with autocast_context(device, True):
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        fkl, rkl = M.token_kl(s, t, b["loss_mask"])
        count = int(b["loss_mask"].sum())
        fkl_sum += float(fkl) * count
        rkl_sum += float(rkl) * count
        n += count
    return fkl_sum / max(n, 1), rkl_sum / max(n, 1)


def as_task(task) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec(str(task), source="test")


def evaluate_model(model, *, teacher, tokenizer, examples, task, spec: EvalSpec, device: torch.device,
                   max_prompt_tokens: int, max_tokens: int, is_teacher: bool = False) -> EvalResult:
    """Decode, score and collect everything the store keeps for one model on one task.

    The headline decode is the greedy one when ``task.greedy`` (samples with seed NULL), else the
    sampled one; metrics of the sampled decode that the greedy decode also reports get the
    suffix ``_sampled``, and so do the sampled decode's per-sample score names."""
    task = as_task(task)
    prompts = [e.prompt for e in examples]
    new_tokens = task.max_new_tokens or spec.max_new_tokens
    result = EvalResult()
    greedy_names: set[str] = set()

    def decode_and_score(seed, greedy):
        outputs = sample_responses(model, tokenizer, prompts, spec, seed, device, max_prompt_tokens, greedy=greedy,
                                   max_new_tokens=new_tokens)
        logprobs = response_logprob(teacher, tokenizer, prompts, outputs, device, max_prompt_tokens,
                                    max_prompt_tokens + new_tokens + 1)
        per, mets = score_decode(task, examples, outputs)
        mets["teacher_logprob"] = statistics.fmean(logprobs)
        suffix = "_sampled" if task.greedy and not greedy else ""  # sample scores named like their metrics
        for e, o, s, lp in zip(examples, outputs, per, logprobs):
            scores = {k + suffix: v for k, v in {**s, "teacher_logprob": lp}.items()}
            result.samples.append({"task": task.name, "prompt_id": e.id, "seed": seed, "prompt": e.prompt,
                                   "output": o, "reference": list(e.references), "scores": scores})
        return outputs, mets

    if task.greedy:
        _, mets = decode_and_score(None, greedy=True)
        greedy_names = set(mets)
        result.metrics += [(task.name, m, v, None) for m, v in mets.items()]
    if task.sample:
        by_prompt: dict[str, list[str]] = {e.id: [] for e in examples}
        for seed in task.seeds or spec.seeds:
            outputs, mets = decode_and_score(seed, greedy=False)
            for e, o in zip(examples, outputs):
                by_prompt[e.id].append(o)
            mets.update(self_bleu=M.self_bleu_across_prompts(outputs), distinct_1=M.distinct_n(outputs, 1),
                        distinct_2=M.distinct_n(outputs, 2))
            result.metrics += [(task.name, m + "_sampled" if m in greedy_names else m, v, seed)
                               for m, v in mets.items() if not (greedy_names and m.startswith("accuracy_"))]
        if len(task.seeds or spec.seeds) > 1:
            result.metrics.append((task.name, "self_bleu_across_seeds", M.self_bleu_per_prompt(by_prompt), None))
    if is_teacher:
        fkl = rkl = 0.0
    else:
        fkl, rkl = reference_kl(model, teacher, tokenizer, examples, device, max_prompt_tokens, max_tokens)
    result.metrics += [(task.name, "fkl_tok", fkl, None), (task.name, "rkl_tok", rkl, None)]
    # Undefined values (Self-BLEU of a single response, ...) are left out rather than stored as NaN.
    result.metrics = [m for m in result.metrics if not math.isnan(m[2])]
    return result


def validation_score(model, tokenizer, examples, spec: EvalSpec, device: torch.device, max_prompt_tokens: int,
                     seed: int = 1, task=None) -> float:
    """The checkpoint-selection score: the validation task's headline metric (ROUGE-L for open
    tasks, accuracy for exact ones, BLEU for translation) of one decode per validation prompt --
    greedy when the task's headline decode is greedy, else sampled with ``seed``."""
    task = as_task(task or "valid")
    outputs = sample_responses(model, tokenizer, [e.prompt for e in examples], spec, None if task.greedy else seed,
                               device, max_prompt_tokens, greedy=task.greedy,
                               max_new_tokens=task.max_new_tokens or spec.max_new_tokens)
    return headline_score(task, examples, outputs)
