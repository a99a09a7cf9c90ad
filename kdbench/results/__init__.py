"""Query and aggregation layer over the run store, used by the leaderboard app.

Pure functions: a SQLAlchemy engine in, pandas DataFrames (or plain lists / dicts) out. Nothing
here writes. Aggregates run in the database (``GROUP BY`` over ``metrics`` / ``samples``); pandas
only combines the already-aggregated per-run rows (one row per run and task), never the samples.

Modules: :mod:`~kdbench.results.stats` (direction, t intervals, Welch), :mod:`~kdbench.results.queries`
(store state, listings, shared SQL), :mod:`~kdbench.results.leaderboard` (leaderboard, fidelity vs
diversity), :mod:`~kdbench.results.detail` (one run), :mod:`~kdbench.results.compare` (two rows),
:mod:`~kdbench.results.paired` (paired tests on per-sample scores, repeats, resolution),
:mod:`~kdbench.results.equivalence` (classes of parallel gradients), :mod:`~kdbench.results.export`
(Markdown). Everything public is importable from ``kdbench.results``.

Statistics (the leaderboard protocol; docs/statistics.md has the full definitions)
------------------------------------------------------------------------------
* Only ``status = 'finished'`` runs count. Failed runs are listed by :func:`failed_runs`.
* A leaderboard row is a *setting* (``runs.setting``, one objective with its parameters) of the
  ``distilled`` role, or a reference row: ``teacher`` and ``student-init`` (labelled by role).
* Suite versions are never mixed. Without an explicit version a suite is shown in its standard version
  (one without ``+overrides``, the label of quick runs) of the most recent finished run
  (:func:`default_version`).
* **Teachers are never mixed either.** Where one suite version holds finished runs under more than one
  reference fingerprint (the teacher by content: the same suite fine-tunes its teacher differently on
  another machine kind), each teacher is its own group, listed and selected as ``VERSION@FP``
  (``2@7ae36e2a``); every function that takes a version takes a group. :func:`run_version` gives a
  run's group.
* **Repeats**: runs with the same ``config_hash`` and reference fingerprint (where the hash is NULL:
  same row, suite, suite version and training seed) are repeats of one experiment (:func:`list_runs` ``repeats``). Every statistic first
  averages all runs of one (row, training seed) into ONE observation — per sampling seed for the metric
  values, per (prompt, sampling seed) for the per-sample scores — so repeats are never pooled as extra
  samples. ``n_runs`` counts distinct training seeds; ``repeats`` the runs averaged into them.
* Per task, the reported **mean** is the mean over the observation's sampling seeds first (one number
  per training seed), then the mean of those over the setting's training seeds.
* The **95 % CI** of a row is a Student-t interval over all per-seed values of the setting
  (every training seed × sampling seed): ``mean ± t(0.975, n-1) · std / sqrt(n)``, ``std`` with ddof=1.
  It describes one row on its own; comparisons between rows use the paired test below.
* The **average** column averages each (run, sampling seed) over the selected tasks first
  (only (run, seed) pairs that have every selected task), then applies the same statistics.
* **Paired test** (:func:`paired_difference`): every row is evaluated on the same prompts with the same
  sampling seeds, so two rows are compared on the per-sample scores aligned per (training seed,
  prompt_id, sampling seed) — training seeds of two settings paired by value; reference rows and single
  runs are one observation paired with every seed of the other side. A paired bootstrap
  (:func:`kdbench.metrics.stats.paired_bootstrap`: prompts resampled with their sampling seeds, and
  training seeds too when there are several; 2000 replicates, seed 0) gives Δ, its 95 % percentile CI
  and a two-sided p. Metrics without a per-sample score (Self-BLEU, distinct-n, token KLs) fall back to
  Welch's t-test on the per-seed values (scipy.stats).
* **rank** orders the distilled settings by the average (or by the single task) with the metric's
  direction (:data:`LOWER_IS_BETTER`); reference rows are not ranked. Members of an **equivalence
  class** (settings whose gradients are parallel, cosine >= 0.9999 in the suite's newest
  ``grad_similarity`` analysis, :mod:`~kdbench.results.equivalence`) that the paired test cannot
  separate from the class's best member share its rank.
* **tied_with_best** (≈ best): the paired test of the row against the best row cannot reject equality
  (p >= ``ALPHA`` = 0.05), or no test is defined; True for the best row itself.
* **vs ce**: the paired test against the best ``ce`` row (does distillation beat fine-tuning on the
  data?); **band_recovered**: ``100 · Δ(row − student-init) / Δ(teacher − student-init)``, paired, with a
  CI from shared bootstrap draws.
* **resolution** (:func:`resolution`): the smallest difference the suite resolves,
  ``1.96 · sqrt(mean over pairs of distilled settings of SE(paired Δ)^2)``.

The t distribution and Welch's test come from ``scipy.stats``; the paired bootstrap is numpy.
"""

from kdbench.results.compare import compare, prompts_differing_most
from kdbench.results.detail import (
    count_samples,
    curves,
    run_detail,
    run_metrics,
    run_summary,
    sample_seeds,
    sample_tasks,
    samples,
    score_names,
    teacher_run_for,
)
from kdbench.results.equivalence import PARALLEL_COSINE, class_of, equivalence_classes, gradient_classes
from kdbench.results.export import leaderboard_markdown, to_markdown
from kdbench.results.leaderboard import COST_COLUMNS, fidelity_diversity, leaderboard, leaderboard_long
from kdbench.results.paired import (
    PairedData,
    band_recovered,
    describe_difference,
    paired_difference,
    repeats_of,
    resolution,
    score_key,
)
from kdbench.results.queries import (
    LEADERBOARD_ROLES,
    REFERENCE_ROLES,
    default_version,
    experiment_key,
    failed_runs,
    grad_similarity,
    grad_similarity_long,
    is_quick_version,
    list_metrics,
    list_runs,
    list_settings,
    list_suites,
    list_tasks,
    metric_tasks,
    run_version,
    split_version,
    status_counts,
    store_fingerprint,
    store_state,
    version_label,
)
from kdbench.results.stats import (
    ALPHA,
    AVERAGE,
    CONFIDENCE,
    LOWER_IS_BETTER,
    lower_is_better,
    stat_col,
    t_quantile,
    t_two_sided_p,
    welch,
)

__all__ = [
    "LOWER_IS_BETTER", "REFERENCE_ROLES", "LEADERBOARD_ROLES", "AVERAGE", "CONFIDENCE", "ALPHA", "COST_COLUMNS",
    "lower_is_better", "stat_col", "t_quantile", "t_two_sided_p", "welch",
    "store_state", "store_fingerprint", "list_suites", "default_version", "is_quick_version", "version_label",
    "run_version", "split_version",
    "list_tasks", "metric_tasks", "list_metrics", "list_settings", "list_runs", "failed_runs", "status_counts",
    "leaderboard_long", "leaderboard", "run_summary", "run_detail", "run_metrics", "teacher_run_for",
    "curves", "samples", "count_samples", "sample_seeds", "sample_tasks", "score_names",
    "compare", "prompts_differing_most",
    "fidelity_diversity", "grad_similarity", "grad_similarity_long", "to_markdown", "leaderboard_markdown",
    "PairedData", "paired_difference", "resolution", "band_recovered", "describe_difference", "score_key",
    "repeats_of", "experiment_key", "PARALLEL_COSINE", "equivalence_classes", "gradient_classes", "class_of",
]
