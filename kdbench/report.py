"""Terminal tables: the end-of-run comparison and ``kdbench show``."""

from __future__ import annotations

import statistics
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.metrics import bootstrap_ci
from kdbench.store import Sample, get_run, run_metrics

# Shown first, in this order; other metrics follow alphabetically.
HEADLINE = ("rougeL", "accuracy", "self_bleu", "distinct_2", "teacher_logprob", "fkl_tok", "rkl_tok", "mean_length",
            "degenerate_frac")


def metric_summary(engine, run_id: int) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(task, metric) → (mean, sample std, number of seeds) over the run's sampling seeds."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for m in run_metrics(engine, run_id):
        groups[(m.task, m.metric)].append(m.value)
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


# Per-sample scores that get a seed-aware bootstrap CI over prompts in the tables.
BOOTSTRAPPED = {"rougeL": "rougeL", "accuracy": "accuracy"}


def sample_cis(engine, run_id: int) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(task, metric) → (mean, lo, hi): 95% bootstrap over prompts, each prompt's seeds kept together."""
    with Session(engine) as s:
        rows = s.execute(select(Sample.task, Sample.prompt_id, Sample.seed, Sample.scores)
                         .where(Sample.run_id == run_id)).all()
    cells: dict[tuple[str, str], dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for task, pid, seed, scores in rows:
        for metric in BOOTSTRAPPED:
            if metric in (scores or {}):
                cells[(task, metric)][pid][seed] = scores[metric]
    out = {}
    for key, by_prompt in cells.items():
        seeds = sorted({sd for d in by_prompt.values() for sd in d}, key=lambda x: (x is None, x))
        matrix = [[d.get(sd, float("nan")) for sd in seeds] for d in by_prompt.values()]
        out[key] = bootstrap_ci(matrix)
    return out


def _order(keys) -> list[tuple[str, str]]:
    rank = {m: i for i, m in enumerate(HEADLINE)}
    return sorted(keys, key=lambda k: (k[0], rank.get(k[1], len(HEADLINE)), k[1]))


def _cell(stat, ci=None) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.3f}"
    return text + (f" [{ci[1]:.2f}, {ci[2]:.2f}]" if ci else "")


def comparison_table(engine, columns: list[tuple[str, int]]) -> str:
    """Rows = (task, metric); columns = labelled runs (e.g. teacher, student-init, this run).
    Cells: mean ± std over sampling seeds; for per-sample metrics also [95% bootstrap CI]."""
    summaries = [metric_summary(engine, rid) for _, rid in columns]
    cis = [sample_cis(engine, rid) for _, rid in columns]
    keys = _order({k for s in summaries for k in s})
    headers = ["task", "metric"] + [f"{label} (run {rid})" for label, rid in columns]
    rows = [[task, metric] + [_cell(s.get((task, metric)), c.get((task, metric))) for s, c in zip(summaries, cis)]
            for task, metric in keys]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    legend = "mean ± std over sampling seeds [95% bootstrap CI over prompts, seed-aware]"
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + ["", legend])


def describe_run(engine, run_id: int) -> str:
    run = get_run(engine, run_id)
    lines = [
        f"run {run.id}: {run.role} {run.setting or ''} on {run.suite} v{run.suite_version}, seed {run.seed}",
        f"status: {run.status}" + (f" ({run.error})" if run.error else ""),
        f"created {run.created_at:%Y-%m-%d %H:%M:%S} UTC"
        + (f", finished {run.finished_at:%Y-%m-%d %H:%M:%S} UTC" if run.finished_at else ""),
    ]
    if run.wall_time_s is not None:
        cost = f"wall {run.wall_time_s:.0f}s"
        if run.train_tokens_per_s:
            cost += f", {run.train_tokens_per_s:.0f} train tok/s"
        if run.peak_memory_mb:
            cost += f", peak memory {run.peak_memory_mb:.0f} MB"
        lines.append(cost)
    if run.selection_rule:
        lines.append(f"checkpoint: step {run.selected_step} ({run.selection_rule})")
    if run.checkpoint_path:
        lines.append(f"student saved at {run.checkpoint_path}")
    git = (run.provenance or {}).get("git", {})
    if git.get("commit"):
        lines.append(f"code: {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}")
    columns = [(run.role if run.role != "distilled" else (run.setting or "run"), run.id)]
    refs = (run.config or {}).get("reference_runs") or {}
    columns = [(role, rid) for role, rid in refs.items()] + columns
    lines += ["", comparison_table(engine, columns)]
    return "\n".join(lines)
