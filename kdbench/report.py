"""Terminal tables: the end-of-run comparison and ``kdbench show`` (with the paired comparisons against the
reference runs, the suite's smallest resolvable difference, the run's gradient class and its repeats)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench.metrics import bootstrap_ci
from kdbench.store import ROLE_STUDENT_INIT, ROLE_TEACHER, Sample, get_run, run_metrics

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
    Cells: mean ± std over sampling seeds; for per-sample metrics also [95% bootstrap CI]. When the last
    column is a distilled run and earlier columns are reference runs, the paired comparisons of
    :func:`paired_lines` follow."""
    summaries = [metric_summary(engine, rid) for _, rid in columns]
    cis = [sample_cis(engine, rid) for _, rid in columns]
    keys = _order({k for s in summaries for k in s})
    headers = ["task", "metric"] + [f"{label} (run {rid})" for label, rid in columns]
    rows = [[task, metric] + [_cell(s.get((task, metric)), c.get((task, metric))) for s, c in zip(summaries, cis)]
            for task, metric in keys]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    legend = "mean ± std over sampling seeds [95% bootstrap CI over prompts, seed-aware]"
    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows] + ["", legend]
    refs = {label: rid for label, rid in columns[:-1] if label in (ROLE_TEACHER, ROLE_STUDENT_INIT)}
    if columns and refs:
        paired = paired_lines(engine, columns[-1][1], refs)
        if paired:
            out += [""] + paired
    return "\n".join(out)


def paired_lines(engine, run_id: int, refs: dict[str, int] | None = None) -> list[str]:
    """The run against its reference runs on the same prompts and sampling seeds, per task and headline
    metric with per-sample scores (rougeL, accuracy): the paired difference vs the teacher and vs the
    undistilled student (mean [95% CI], p), the share of the teacher − undistilled band recovered, and the
    suite's smallest resolvable difference. ``refs``: {role: run id} (default: the run's
    ``config["reference_runs"]``). [] for a run that is not a finished distilled run."""
    from kdbench import results as R
    from kdbench.results.paired import PairedData, describe_difference

    run = get_run(engine, run_id)
    if run is None or run.role != "distilled" or run.status != "finished":
        return []
    refs = dict(refs if refs is not None else reference_runs(engine, run))
    me = f"run:{run.id}"
    sel = {role: f"run:{rid}" for role, rid in refs.items() if role in (ROLE_TEACHER, ROLE_STUDENT_INIT)}
    out = []
    version = R.run_version(engine, run.id)  # its teacher group where the version holds several teachers
    for task in R.sample_tasks(engine, run.id):
        for metric in BOOTSTRAPPED:
            if task not in R.metric_tasks(engine, run.suite, version, metric):
                continue  # not what this task is read by (micro v3: trivia is read by accuracy, not ROUGE-L)
            data = PairedData(engine, run.suite, version, metric, [task], selectors=[me, *sel.values()])
            if not data.has(me):
                continue
            out.append(f"{task} {metric}, paired on the same prompts and sampling seeds (this run − reference):")
            for role, s in sel.items():
                if data.has(s):
                    out.append(f"  vs {role} (run {refs[role]}): {describe_difference(data.test(me, s))}")
            if ROLE_TEACHER in sel and ROLE_STUDENT_INIT in sel and data.has(sel[ROLE_TEACHER]) \
                    and data.has(sel[ROLE_STUDENT_INIT]):
                data.sides[ROLE_TEACHER] = data.sides[sel[ROLE_TEACHER]]
                data.sides[ROLE_STUDENT_INIT] = data.sides[sel[ROLE_STUDENT_INIT]]
                b = data.band(me)
                if b["mean"] == b["mean"]:
                    ci = f" [{b['lo']:.1f}, {b['hi']:.1f}]" if b["lo"] == b["lo"] else " (no CI: < 2 prompts)"
                    out.append(f"  teacher − undistilled band recovered: {b['mean']:.1f} %{ci}")
            res = R.resolution(engine, run.suite, version, task, metric)
            if res["value"] == res["value"]:
                out.append(f"  smallest resolvable difference on this suite: {res['value']:.2f} (1.96 × pooled paired "
                           f"SE over {res['n_pairs']} {res['basis']})")
    return out


def reference_runs(engine, run) -> dict[str, int]:
    """{role: run id} of the run's reference rows: ``config["reference_runs"]``, else the finished teacher
    and student-init runs of its suite version (the one with the run's reference fingerprint, else the
    newest)."""
    from sqlalchemy import select as _select

    from kdbench.store import Run

    refs = (run.config or {}).get("reference_runs") or {}
    if refs or run.role != "distilled":
        return dict(refs)
    fp = (run.config or {}).get("reference_fingerprint")
    out = {}
    with Session(engine) as s:
        for role in (ROLE_TEACHER, ROLE_STUDENT_INIT):
            cands = s.execute(_select(Run.id, Run.config).where(
                Run.role == role, Run.suite == run.suite, Run.suite_version == run.suite_version,
                Run.status == "finished").order_by(Run.id.desc())).all()
            pick = next((c for c in cands if fp is not None and (c.config or {}).get("reference_fingerprint") == fp),
                        cands[0] if cands else None)
            if pick is not None:
                out[role] = int(pick.id)
    return out


def class_and_repeat_lines(engine, run_id: int) -> list[str]:
    """The run's gradient equivalence class (from the suite's newest grad_similarity analysis) and its
    repeats (finished runs of the same experiment)."""
    from kdbench import results as R
    from kdbench.results.equivalence import class_of, gradient_classes
    from kdbench.results.paired import repeats_of

    run = get_run(engine, run_id)
    if run is None:
        return []
    out = []
    if run.role == "distilled" and run.setting:
        c = class_of(gradient_classes(engine, run.suite), run.setting)
        if c is not None:
            settings = set(R.list_settings(engine, run.suite, R.run_version(engine, run.id)).setting)
            others = [m for m in c["members"] if m != run.setting]
            missing = [m for m in others if m not in settings]
            out.append(f"gradient class: {c['reason']} (analysis run {c['run_id']})"
                       + (f"; no finished run of {', '.join(missing)} in v{run.suite_version}" if missing else ""))
            out.append("  the leaderboard ranks the class together unless the paired test separates its members")
    reps = repeats_of(engine, run_id)
    if len(reps) > 1:
        key = f"config_hash {run.config_hash[:16]}" if run.config_hash else \
            f"same setting, suite version and training seed {run.seed}"
        out.append(f"repeats: runs {', '.join(f'#{r}' for r in reps)} are one experiment ({key}); the leaderboard "
                   "averages them into one observation")
    return out


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
    refs = reference_runs(engine, run)
    columns = [(role, rid) for role, rid in refs.items()] + columns
    lines += class_and_repeat_lines(engine, run.id)
    lines += ["", comparison_table(engine, columns)]
    return "\n".join(lines)
