"""A realistic run store for the results-layer, app and browser tests, written with ``RunWriter``.

Every number is a closed form so tests can state expected values computed by hand:

    value(row, task, metric, training seed, sampling seed)
        = BASE[metric][task][row] + SPREAD[metric] * (TRAIN_OFF[training seed] + SAMPLE_OFF[sampling seed])

with TRAIN_OFF = {1: -1, 2: +1} (reference rows have one run, offset 0) and
SAMPLE_OFF = {10: -1, 20: 0, 30: +1}. So every distilled setting's per-seed values on a task are
base + spread * {-2, -1, 0, 0, 1, 2}: mean = base, std = spread * sqrt(2), n = 6; reference rows
have base + spread * {-1, 0, 1}: std = spread, n = 3.

Per-prompt sample scores: rougeL = metric value of the (run, task, seed) + SLOPE[row] * (p - 9.5)
for prompt p = 0..19 (the mean over prompts is the metric value); on the exact-answer task
micro/arith, accuracy is 100 for the first value/5 prompts and 0 otherwise (mean = the metric).

Paired differences between two rows are therefore d(p) = ΔBASE + ΔSLOPE · (p - 9.5) on every seed (the seed
offsets are common to all rows and cancel): SLOPE sets how well the paired test resolves each pair (csd(S,S) vs
csd(T,S): ΔSLOPE 0.4, not separated; kl / rkl vs the best: separated).

Besides the finished rows: one failed run (its own setting), one still-running kl run (with a bogus
rougeL 99 that must not count), a kl run of the stale suite version "0" (rougeL 99), and one
finished analysis run with a ``grad_similarity`` artifact (csd(S,S) ∥ rkl: cosine 1, gradient ×2).

``build_paired_store`` writes a second, smaller store for the paired statistics: repeats (one config_hash,
and config_hash NULL), a ``ce`` row, a pair Welch cannot separate but the paired test can, and an
equivalence class the paired test cannot separate.

``big=True`` appends thousands of synthetic runs and hundreds of thousands of samples with bulk
inserts (for scripts/bench_leaderboard.py).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from sqlalchemy import insert

from kdbench.store import CurvePoint, Metric, Run, RunWriter, Sample, open_engine, utcnow

SUITE = "micro"
VERSION = "1"
TEST = "micro/test"
ARITH = "micro/arith"
TASKS = (TEST, ARITH)
KL = "kl"
RKL = "rkl"
CSD_SS = "csd(tau=1.0,w1=S,w2=S)"
CSD_TS = "csd(tau=1.0,w1=T,w2=S)"
FAILED_SETTING = "csd(tau=1.5,w1=U,w2=S)"
SETTINGS = (KL, RKL, CSD_SS, CSD_TS)
TEACHER = "teacher"
STUDENT = "student-init"
ROWS = (TEACHER, STUDENT, *SETTINGS)
TRAIN_SEEDS = (1, 2)
SAMPLE_SEEDS = (10, 20, 30)
TRAIN_OFF = {1: -1, 2: 1}
SAMPLE_OFF = {10: -1, 20: 0, 30: 1}
N_PROMPTS = 20
FAIL_REASON = "RuntimeError: loss is NaN at step 40 (objective csd, lr 1e-4)"

PARAMS = {KL: {}, RKL: {}, CSD_SS: {"tau": 1.0, "w1": "S", "w2": "S"}, CSD_TS: {"tau": 1.0, "w1": "T", "w2": "S"}}
OBJECTIVE = {KL: "kl", RKL: "rkl", CSD_SS: "csd", CSD_TS: "csd"}

# BASE[metric][task] = {row: base}; a row missing from a metric has no value for it.
_SAME = lambda d: {TEST: d, ARITH: d}  # noqa: E731
BASE: dict[str, dict[str, dict[str, float]]] = {
    "rougeL": {
        TEST: {TEACHER: 30.0, STUDENT: 10.0, KL: 22.0, RKL: 23.0, CSD_SS: 25.0, CSD_TS: 24.5},
        ARITH: {TEACHER: 50.0, STUDENT: 20.0, KL: 40.0, RKL: 38.0, CSD_SS: 41.0, CSD_TS: 42.0},
    },
    "self_bleu": {
        TEST: {TEACHER: 28.0, STUDENT: 20.0, KL: 30.0, RKL: 45.0, CSD_SS: 50.0, CSD_TS: 35.0},
        ARITH: {TEACHER: 60.0, STUDENT: 55.0, KL: 62.0, RKL: 70.0, CSD_SS: 72.0, CSD_TS: 65.0},
    },
    "distinct_2": _SAME({TEACHER: 0.80, STUDENT: 0.90, KL: 0.78, RKL: 0.60, CSD_SS: 0.55, CSD_TS: 0.70}),
    "distinct_1": _SAME({TEACHER: 0.60, STUDENT: 0.70, KL: 0.58, RKL: 0.40, CSD_SS: 0.35, CSD_TS: 0.50}),
    "accuracy": {ARITH: {TEACHER: 60.0, STUDENT: 20.0, KL: 40.0, RKL: 35.0, CSD_SS: 45.0, CSD_TS: 50.0}},
    "mean_length": _SAME({TEACHER: 40.0, STUDENT: 55.0, KL: 42.0, RKL: 30.0, CSD_SS: 28.0, CSD_TS: 38.0}),
    "degenerate_frac": _SAME({TEACHER: 0.02, STUDENT: 0.20, KL: 0.05, RKL: 0.04, CSD_SS: 0.03, CSD_TS: 0.04}),
    "fkl_tok": _SAME({STUDENT: 1.50, KL: 0.40, RKL: 0.60, CSD_SS: 0.55, CSD_TS: 0.45}),
    "rkl_tok": _SAME({STUDENT: 1.20, KL: 0.50, RKL: 0.30, CSD_SS: 0.30, CSD_TS: 0.40}),
    "teacher_logprob": _SAME({STUDENT: -2.5, KL: -1.2, RKL: -0.9, CSD_SS: -0.95, CSD_TS: -1.1}),
}
SPREAD = {"rougeL": 1.0, "self_bleu": 1.0, "distinct_2": 0.01, "distinct_1": 0.01, "accuracy": 5.0,
          "mean_length": 1.0, "degenerate_frac": 0.01, "fkl_tok": 0.01, "rkl_tok": 0.01, "teacher_logprob": 0.01}
SLOPE = {TEACHER: 0.0, STUDENT: 0.1, KL: 0.2, RKL: -0.2, CSD_SS: 0.4, CSD_TS: 0.0}
COST = {  # (wall_time_s, train_tokens_per_s, peak_memory_mb) per training seed
    KL: {1: (100.0, 2000.0, 900.0), 2: (110.0, 2100.0, 910.0)},
    RKL: {1: (102.0, 1980.0, 905.0), 2: (108.0, 2020.0, 915.0)},
    CSD_SS: {1: (120.0, 1800.0, 950.0), 2: (130.0, 1700.0, 970.0)},
    CSD_TS: {1: (118.0, 1850.0, 940.0), 2: (122.0, 1750.0, 960.0)},
}
PROMPTS = [
    "Explain why the sky is blue.", "Give three tips for staying healthy.", "What is the capital of France?",
    "Summarise the plot of Hamlet in two sentences.", "Write a haiku about autumn.",
    "How do vaccines work?", "Describe a cat to someone who has never seen one.",
    "List the planets of the solar system.", "Why do we have seasons?", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "Give an example of a metaphor.",
    "What causes earthquakes?", "Explain recursion to a child.", "Name two uses of copper.",
    "What is the boiling point of water at sea level?", "Suggest a name for a bakery.",
    "How does a bicycle stay upright?", "What is inflation?", "Describe the water cycle.",
]
GRAD_NAMES = [KL, RKL, CSD_SS, CSD_TS]
GRAD_COSINE = [[1.0, 0.2, 0.3, 0.6], [0.2, 1.0, 1.0, 0.7], [0.3, 1.0, 1.0, 0.75], [0.6, 0.7, 0.75, 1.0]]
GRAD_NORMS = [1.1, 0.9, 1.8, 1.2]
GRAD_NORM_RATIO = [[a / b for b in GRAD_NORMS] for a in GRAD_NORMS]  # ‖g_row‖ / ‖g_col‖, as kdbench.analyze


def metric_value(row: str, task: str, metric: str, train_seed: int | None, sample_seed: int) -> float:
    off = (TRAIN_OFF[train_seed] if train_seed is not None else 0) + SAMPLE_OFF[sample_seed]
    return BASE[metric][task][row] + SPREAD[metric] * off


def prompt_text(task: str, p: int) -> str:
    if task == ARITH:
        return f"What is {p + 3} times {p + 4}? Answer with the number after ####."
    return PROMPTS[p % len(PROMPTS)]


def reference_of(task: str, p: int):
    if task == ARITH:
        return [f"#### {(p + 3) * (p + 4)}", f"The answer is {(p + 3) * (p + 4)}."]
    return f"Reference answer {p:02d}: {PROMPTS[p % len(PROMPTS)].lower()}"


def output_text(row: str, task: str, p: int, train_seed: int | None, seed: int) -> str:
    who = f"{row} (train seed {train_seed})" if train_seed is not None else row
    return f"{who} answer to {task} p{p:02d}, sampling seed {seed}."


def _metric_rows(row: str, train_seed: int | None):
    for metric, per_task in BASE.items():
        for task, per_row in per_task.items():
            if row in per_row:
                for s in SAMPLE_SEEDS:
                    yield task, metric, metric_value(row, task, metric, train_seed, s), s


def _sample_rows(row: str, train_seed: int | None):
    for task in TASKS:
        for s in SAMPLE_SEEDS:
            rouge = metric_value(row, task, "rougeL", train_seed, s)
            k = round(metric_value(row, task, "accuracy", train_seed, s) / 5.0) if task == ARITH else 0
            for p in range(N_PROMPTS):
                scores = {"rougeL": rouge + SLOPE[row] * (p - 9.5)}
                if task == ARITH:
                    scores["accuracy"] = 100.0 if p < k else 0.0
                yield {"task": task, "prompt_id": f"p{p:02d}", "seed": s, "prompt": prompt_text(task, p),
                       "output": output_text(row, task, p, train_seed, s), "reference": reference_of(task, p),
                       "scores": scores}


def _config(row: str, seed: int, version: str = VERSION) -> dict:
    return {"suite": SUITE, "suite_version": version, "objective": OBJECTIVE.get(row), "params": PARAMS.get(row, {}),
            "seed": seed, "lr": 1e-4, "batch_size": 8, "max_steps": 100, "sample_seeds": list(SAMPLE_SEEDS),
            "reference_fingerprint": "fp-micro-1", "teacher": "SmolLM2-135M-Instruct", "student": "micro-8L"}


PROVENANCE = {"git_commit": "0123abcd", "packages": {"torch": "2.13.0", "transformers": "5.0.0"},
              "host": "fixture-host"}


def _terms(objective: str, loss: float) -> dict:
    if objective == "csd":
        return {"var_w1": 0.55 * loss, "var_w2": 0.45 * loss, "mean_gap_sq": 0.01 * loss}
    return {objective: loss}


def build_fixture_store(path_or_url: str | Path, big: bool = False, big_settings: int = 40,
                        big_seeds: int = 50, big_prompts: int = 20) -> dict:
    """Write the fixture store and return the ids: {"teacher": id, "student-init": id,
    <setting>: [run ids by training seed], "failed": id, "running": id, "stale": id, "analysis": id}."""
    engine = open_engine(str(path_or_url))
    ids: dict = {}
    common = dict(suite=SUITE, provenance=PROVENANCE)

    for row in (TEACHER, STUDENT):
        w = RunWriter.start(engine, role=row, suite_version=VERSION, seed=0, config=_config(row, 0), **common)
        w.metrics(_metric_rows(row, None))
        w.samples(_sample_rows(row, None))
        w.finish(wall_time_s=15.0 if row == TEACHER else 5.0)
        ids[row] = w.run_id

    for setting in SETTINGS:
        ids[setting] = []
        obj = OBJECTIVE[setting]
        for ts in TRAIN_SEEDS:
            w = RunWriter.start(engine, role="distilled", suite_version=VERSION, seed=ts, config=_config(setting, ts),
                                objective=obj, params=PARAMS[setting], setting=setting, **common)
            for i, step in enumerate(range(0, 101, 20)):
                loss = 2.0 * math.exp(-step / 50.0) + 0.1 * ts
                w.curve(step, loss, terms=_terms(obj, loss), lr=1e-4, tokens=step * 2048, elapsed_s=step * 1.0)
            for step in (50, 100):
                w.curve(step, 1.0 + 50.0 / (step + 50.0), split="valid",
                        terms={"rougeL": BASE["rougeL"][TEST][setting] - 100.0 / step}, tokens=step * 2048)
            w.metrics(_metric_rows(setting, ts))
            w.samples(_sample_rows(setting, ts))
            wall, tps, mem = COST[setting][ts]
            w.finish(wall_time_s=wall, train_tokens_per_s=tps, peak_memory_mb=mem,
                     selection_rule="max valid rougeL", selected_step=100, checkpoint_path=f"ckpt/{setting}/{ts}")
            ids[setting].append(w.run_id)

    w = RunWriter.start(engine, role="distilled", suite_version=VERSION, seed=1, config=_config(CSD_SS, 1),
                        objective="csd", params={"tau": 1.5, "w1": "U", "w2": "S"}, setting=FAILED_SETTING, **common)
    w.curve(0, 2.0, terms=_terms("csd", 2.0))
    w.curve(20, float("nan"), terms={})
    w.fail(FAIL_REASON)
    ids["failed"] = w.run_id

    w = RunWriter.start(engine, role="distilled", suite_version=VERSION, seed=3, config=_config(KL, 3),
                        objective="kl", params={}, setting=KL, **common)
    w.curve(0, 2.3, terms={"kl": 2.3})
    w.metrics([(TEST, "rougeL", 99.0, 10)])  # must not count: the run has not finished
    ids["running"] = w.run_id

    w = RunWriter.start(engine, role="distilled", suite_version="0", seed=1, config=_config(KL, 1, "0"),
                        objective="kl", params={}, setting=KL, **common)
    w.metrics([(TEST, "rougeL", 99.0, s) for s in SAMPLE_SEEDS])
    w.finish(wall_time_s=1.0)
    ids["stale"] = w.run_id

    w = RunWriter.start(engine, role="analysis", suite_version=VERSION, seed=0, config={"analysis": "grad_similarity"},
                        **common)
    w.artifact("grad_similarity", {"names": GRAD_NAMES, "cosine": GRAD_COSINE, "norm_ratio": GRAD_NORM_RATIO,
                                   "grad_norms": GRAD_NORMS})
    w.finish()
    ids["analysis"] = w.run_id

    if big:
        ids["big_runs"] = _bulk(engine, big_settings, big_seeds, big_prompts)
    engine.dispose()
    return ids


def _bulk(engine, n_settings: int, n_seeds: int, n_prompts: int) -> int:
    """Synthetic distilled runs with bulk inserts: n_settings × n_seeds runs, each with every metric of
    BASE on both tasks × 3 sampling seeds, n_prompts samples per task and seed, and 10 curve points."""
    rng = random.Random(0)
    now = utcnow()
    with engine.begin() as c:
        start = (c.execute(Run.__table__.select().with_only_columns(Run.id).order_by(Run.id.desc()).limit(1))
                 .scalar() or 0) + 1
    run_rows, metric_rows, sample_rows, curve_rows = [], [], [], []
    rid = start
    for i in range(n_settings):
        setting = f"synth(a={i})"
        quality = rng.uniform(15, 30)
        for ts in range(n_seeds):
            run_rows.append(dict(id=rid, role="distilled", objective="synth", params={"a": i}, setting=setting,
                                 suite=SUITE, suite_version=VERSION, seed=ts, status="finished", created_at=now,
                                 finished_at=now, config={"objective": "synth"}, provenance=PROVENANCE,
                                 wall_time_s=rng.uniform(90, 130), train_tokens_per_s=rng.uniform(1500, 2200),
                                 peak_memory_mb=rng.uniform(880, 990)))
            for metric in BASE:
                for task in TASKS:
                    if task not in BASE[metric]:
                        continue
                    base = quality if metric == "rougeL" else BASE[metric][task].get(KL, 0.5)
                    for s in SAMPLE_SEEDS:
                        metric_rows.append(dict(run_id=rid, task=task, metric=metric, seed=s,
                                                value=base + SPREAD[metric] * rng.gauss(0, 1)))
            for task in TASKS:
                for s in SAMPLE_SEEDS:
                    for p in range(n_prompts):
                        sample_rows.append(dict(run_id=rid, task=task, prompt_id=f"p{p:02d}", seed=s,
                                                prompt=prompt_text(task, p), output=f"synth {i}/{ts} p{p} s{s}",
                                                reference="ref", scores={"rougeL": quality + rng.gauss(0, 5)}))
            for step in range(0, 100, 10):
                curve_rows.append(dict(run_id=rid, step=step, split="train", loss=2.0 / (1 + step),
                                       terms={"synth": 1.0}, lr=1e-4, tokens=step * 2048, elapsed_s=float(step)))
            rid += 1
    with engine.begin() as c:
        c.execute(insert(Run.__table__), run_rows)
        for table, rows in ((Metric.__table__, metric_rows), (Sample.__table__, sample_rows),
                            (CurvePoint.__table__, curve_rows)):
            for k in range(0, len(rows), 50_000):
                c.execute(insert(table), rows[k:k + 50_000])
    return len(run_rows)


# ---------------------------------------------------------------------------- standard and quick-run versions

QUICK = "1+steps=3,eval_limit=3"
CHATTERBOT = "chatterbot"
# rougeL per row on the real task name: base + {-1, 0, +1} over the sampling seeds 10/20/30
VERSION_ROUGE = {VERSION: {TEACHER: 30.0, STUDENT: 5.0, KL: 20.0},
                 QUICK: {TEACHER: 31.0, STUDENT: 4.0, KL: 6.0, RKL: 8.0}}
# seed-free metrics (seed NULL), one value per run, as kdbench.evaluation.protocol writes them
ACROSS_SEEDS = {TEACHER: 7.5, STUDENT: 2.5, KL: 2.1, RKL: 4.7}


def build_versions_store(path_or_url: str | Path, standard: bool = True, standard_distilled: bool = True) -> dict:
    """A store shaped like `kdbench run` output: task ``chatterbot``, rougeL per sampling seed plus the seed-free
    ``self_bleu_across_seeds`` and ``fkl_tok``. Suite version "1" (teacher, student-init and, with
    ``standard_distilled``, kl; left out without ``standard``) is written first; the quick-run version
    ``1+steps=3,eval_limit=3`` (teacher, student-init, kl, rkl) after it, so it is the newest.
    Returns {(version, row): run id}."""
    engine = open_engine(str(path_or_url))
    ids: dict = {}
    plan = []
    if standard:
        plan += [(VERSION, r) for r in VERSION_ROUGE[VERSION] if standard_distilled or r in (TEACHER, STUDENT)]
    plan += [(QUICK, r) for r in VERSION_ROUGE[QUICK]]
    for version, row in plan:
        distilled = row not in (TEACHER, STUDENT)
        w = RunWriter.start(engine, role="distilled" if distilled else row, suite=SUITE, suite_version=version,
                            seed=0, config={"suite_version": version}, provenance=PROVENANCE,
                            objective=row if distilled else None, setting=row)
        base = VERSION_ROUGE[version][row]
        w.metrics([(CHATTERBOT, "rougeL", base + SAMPLE_OFF[s], s) for s in SAMPLE_SEEDS]
                  + [(CHATTERBOT, "self_bleu_across_seeds", ACROSS_SEEDS[row], None),
                     (CHATTERBOT, "fkl_tok", 0.0 if row == TEACHER else 9.0, None)])
        if distilled:
            w.curve(3, 9.8, terms={}, lr=3e-5, tokens=1261)
        w.samples({"task": CHATTERBOT, "prompt_id": "0042eb7147bc", "seed": s,
                   "prompt": "Yesterday was the 13th, right?",
                   "output": f"{row} says\n\n\n\n\nsomething", "reference": ["Yes, that is correct."],
                   "scores": {"rougeL": base + SAMPLE_OFF[s], "length": 3, "degenerate": 0.0}} for s in SAMPLE_SEEDS)
        w.finish(wall_time_s=100.0, selection_rule="last step" if distilled else None,
                 selected_step=3 if distilled else None)
        ids[(version, row)] = w.run_id
    engine.dispose()
    return ids


# ---------------------------------------------------------------------------- the paired-statistics store

CE = "ce"
PAIRED_TASK = "chatterbot"
PAIRED_SETTINGS = (CSD_SS, RKL, KL, CE)
PAIRED_SEEDS = (0, 1)
PAIRED_PROMPTS = 12
# per-sample score(row, training seed, prompt p, sampling seed k)
#   = PAIRED_BASE[row] + PROMPT_EFF(p) + SEED_EFF[k] + PAIRED_TRAIN[row][seed] + WIGGLE[row] * (-1)^p
# PROMPT_EFF(p) = 2 (p - 5.5) and SEED_EFF are shared by every row: they cancel in paired differences
# but inflate the per-seed spread that Welch sees. Means over the 12 prompts: WIGGLE and PROMPT_EFF vanish.
PAIRED_BASE = {TEACHER: 40.0, STUDENT: 10.0, CSD_SS: 30.0, RKL: 29.9, KL: 29.5, CE: 25.0}
SEED_EFF = {10: -3.0, 20: 0.0, 30: 3.0}
PAIRED_TRAIN = {s: {0: 0.5, 1: -0.5} for s in PAIRED_SETTINGS}
WIGGLE = {TEACHER: 0.0, STUDENT: 0.0, CSD_SS: 0.0, RKL: 1.5, KL: 0.2, CE: 0.0}
# repeats: (setting, training seed) -> offsets of its runs (their mean is 0: the observation is unchanged)
# csd(S,S) seed 0: two runs with one config_hash; ce seed 1: two runs with config_hash NULL (older rows)
PAIRED_REPEATS = {(CSD_SS, 0): (-0.3, 0.3), (CE, 1): (-0.4, 0.4)}
PAIRED_SELF_BLEU = {TEACHER: 30.0, STUDENT: 60.0, CSD_SS: 35.0, RKL: 36.0, KL: 40.0, CE: 45.0}
PAIRED_GRAD_NAMES = [KL, RKL, CSD_SS, CE]
PAIRED_GRAD_NORMS = [1.0, 0.5, 1.0, 0.8]
# rkl ∥ csd(S,S) (cosine 0.99999 >= 0.9999, csd's gradient twice rkl's); kl-csd 0.9998 is just below the bar
PAIRED_GRAD_COSINE = [[1.0, 0.9, 0.9998, 0.5], [0.9, 1.0, 0.99999, 0.5], [0.9998, 0.99999, 1.0, 0.5],
                      [0.5, 0.5, 0.5, 1.0]]


def paired_score(row: str, train_seed: int | None, p: int, k: int, offset: float = 0.0) -> float:
    train = PAIRED_TRAIN[row][train_seed] if train_seed is not None and row in PAIRED_TRAIN else 0.0
    return PAIRED_BASE[row] + 2.0 * (p - 5.5) + SEED_EFF[k] + train + WIGGLE[row] * (-1) ** p + offset


def build_paired_store(path_or_url: str | Path) -> dict:
    """A store made for the paired statistics (one task, ``chatterbot``, 12 prompts, sampling seeds
    10/20/30, training seeds 0 and 1), see PAIRED_* above. Returns {row: [run ids]} and "analysis".

    Expected by hand: means csd(S,S) 30.0, rkl 29.9, kl 29.5, ce 25.0 (the repeats average out; pooling
    them as runs would give csd(S,S) 30.1667 and n 9); paired kl − csd(S,S) = −0.5 ± 0.2 on every prompt
    (separated) while Welch on the per-seed values (std sqrt(7.5), n 6 each) gives p 0.76 (tied); paired
    rkl − csd(S,S) = −0.1 ± 1.5 (not separated: one class, one rank); csd(S,S) recovers 20/30 = 66.67 % of
    the teacher − student-init band, its paired CI [65.0, 68.33] (seed level: 20.5 or 19.5 out of 30)."""
    engine = open_engine(str(path_or_url))
    ids: dict = {}
    plan = [(TEACHER, 0, 0.0), (STUDENT, 0, 0.0)]
    for setting in PAIRED_SETTINGS:
        for ts in PAIRED_SEEDS:
            plan += [(setting, ts, off) for off in PAIRED_REPEATS.get((setting, ts), (0.0,))]
    for row, ts, off in plan:
        ref = row in (TEACHER, STUDENT)
        w = RunWriter.start(engine, role=row if ref else "distilled", suite=SUITE, suite_version=VERSION, seed=ts,
                            config={"suite_version": VERSION, "seed": ts, "reference_fingerprint": "fp-paired"},
                            provenance=PROVENANCE, objective=None if ref else row.split("(")[0], setting=row,
                            params={})
        scores = {k: [paired_score(row, None if ref else ts, p, k, off) for p in range(PAIRED_PROMPTS)]
                  for k in SAMPLE_SEEDS}
        w.metrics([(PAIRED_TASK, "rougeL", sum(v) / len(v), k) for k, v in scores.items()]
                  + [(PAIRED_TASK, "self_bleu", PAIRED_SELF_BLEU[row] + SAMPLE_OFF[k], k) for k in SAMPLE_SEEDS])
        w.samples({"task": PAIRED_TASK, "prompt_id": f"q{p:02d}", "seed": k, "prompt": f"Prompt {p}?",
                   "output": f"{row} {ts} q{p:02d} {k}", "reference": [f"Answer {p}."],
                   "scores": {"rougeL": scores[k][p], "length": 3}} for k in SAMPLE_SEEDS for p in range(PAIRED_PROMPTS))
        null_hash = (row, ts) == (CE, 1)
        w.finish(wall_time_s=50.0, config_hash=None if null_hash else f"h-{row}-{ts}")
        ids.setdefault(row, []).append(w.run_id)
    w = RunWriter.start(engine, role="analysis", suite=SUITE, suite_version=VERSION, seed=0, config={},
                        provenance=PROVENANCE, setting="analysis")
    w.artifact("grad_similarity", {"names": PAIRED_GRAD_NAMES, "cosine": PAIRED_GRAD_COSINE,
                                   "norm_ratio": [[a / b for b in PAIRED_GRAD_NORMS] for a in PAIRED_GRAD_NORMS],
                                   "grad_norms": PAIRED_GRAD_NORMS, "positions": 64})
    w.finish()
    ids["analysis"] = w.run_id
    engine.dispose()
    return ids


def rows(db, model, **where):
    """Rows of one table of the store at ``db``, filtered by column equality."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    with Session(open_engine(str(db))) as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return list(s.scalars(q))
