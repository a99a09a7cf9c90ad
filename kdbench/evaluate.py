"""Evaluation: sample responses over several seeds and score them (metrics in kdbench/metrics.py).

The protocol (REFERENCE §3, fixed by the suite's EvalSpec): for each sampling seed, responses
to every test prompt are sampled with temperature 1, top-p 1, no top-k, cut at the end of
turn. Per sample we keep ROUGE-L (stemmed, max over references, × 100), length and whether it
is degenerate; per seed the mean ROUGE-L, Self-BLEU across prompts, distinct-1/2, mean length,
degenerate fraction and the teacher's mean log-likelihood of the responses; seed-free, the
Self-BLEU among one prompt's samples across seeds and the token-level forward / reverse KL
between teacher and student on the references.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kdbench import metrics as M
from kdbench.data.batching import chat_prompt, collate, encode
from kdbench.suites import EvalSpec
from kdbench.train import autocast_context


@dataclass
class EvalResult:
    metrics: list[tuple[str, str, float, int | None]] = field(default_factory=list)  # (task, metric, value, seed)
    samples: list[dict] = field(default_factory=list)

    def mean(self, task: str, metric: str) -> float:
        vals = [v for t, m, v, s in self.metrics if t == task and m == metric]
        return statistics.fmean(vals) if vals else float("nan")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], spec: EvalSpec, seed: int, device: torch.device,
                     max_prompt_tokens: int) -> list[str]:
    """One sampled response per prompt. Batches are fixed by prompt order, so a seed gives the
    same samples for the same model whatever else runs."""
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    outputs: list[str] = []
    for start in range(0, len(prompts), spec.batch_size):
        chunk = [chat_prompt(tokenizer, p) for p in prompts[start:start + spec.batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens,
                        add_special_tokens=False).to(device)
        with autocast_context(device, True):
            out = model.generate(**enc, do_sample=True, temperature=spec.temperature, top_p=spec.top_p,
                                 top_k=spec.top_k, max_new_tokens=spec.max_new_tokens,
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


def evaluate_model(model, *, teacher, tokenizer, examples, task: str, spec: EvalSpec, device: torch.device,
                   max_prompt_tokens: int, max_tokens: int, is_teacher: bool = False) -> EvalResult:
    """Sample, score and collect everything the store keeps for one model on one task."""
    prompts = [e.prompt for e in examples]
    result = EvalResult()
    by_prompt: dict[str, list[str]] = {e.id: [] for e in examples}
    for seed in spec.seeds:
        outputs = sample_responses(model, tokenizer, prompts, spec, seed, device, max_prompt_tokens)
        logprobs = response_logprob(teacher, tokenizer, prompts, outputs, device, max_prompt_tokens,
                                    max_prompt_tokens + spec.max_new_tokens + 1)
        rouge = [M.rouge_l(o, list(e.references)) for o, e in zip(outputs, examples)]
        for e, o, r, lp in zip(examples, outputs, rouge, logprobs):
            by_prompt[e.id].append(o)
            result.samples.append({
                "task": task, "prompt_id": e.id, "seed": seed, "prompt": e.prompt, "output": o,
                "reference": list(e.references),
                "scores": {"rougeL": r, "length": M.response_length(o), "degenerate": float(M.is_degenerate(o)),
                           "teacher_logprob": lp},
            })
        result.metrics += [
            (task, "rougeL", statistics.fmean(rouge), seed),
            (task, "self_bleu", M.self_bleu_across_prompts(outputs), seed),
            (task, "distinct_1", M.distinct_n(outputs, 1), seed),
            (task, "distinct_2", M.distinct_n(outputs, 2), seed),
            (task, "mean_length", statistics.fmean(M.response_length(o) for o in outputs), seed),
            (task, "degenerate_frac", statistics.fmean(float(M.is_degenerate(o)) for o in outputs), seed),
            (task, "teacher_logprob", statistics.fmean(logprobs), seed),
        ]
    result.metrics.append((task, "self_bleu_across_seeds", M.self_bleu_per_prompt(by_prompt), None))
    if is_teacher:
        fkl = rkl = 0.0
    else:
        fkl, rkl = reference_kl(model, teacher, tokenizer, examples, device, max_prompt_tokens, max_tokens)
    result.metrics += [(task, "fkl_tok", fkl, None), (task, "rkl_tok", rkl, None)]
    return result


def validation_score(model, tokenizer, examples, spec: EvalSpec, device: torch.device, max_prompt_tokens: int,
                     seed: int = 1) -> float:
    """Mean ROUGE-L of one sampled response per validation prompt: the checkpoint-selection score."""
    outputs = sample_responses(model, tokenizer, [e.prompt for e in examples], spec, seed, device, max_prompt_tokens)
    return statistics.fmean(M.rouge_l(o, list(e.references)) for o, e in zip(outputs, examples))
