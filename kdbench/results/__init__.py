"""Query and aggregation layer over the run store, used by the leaderboard app.

Pure functions: a SQLAlchemy engine in, pandas DataFrames (or plain lists / dicts) out. Nothing
here writes. Aggregates run in the database (``GROUP BY`` over ``metrics`` / ``samples``); pandas
only combines the already-aggregated per-run rows (one row per run and task), never the samples.

Modules: :mod:`~kdbench.results.stats` (direction, t intervals, Welch), :mod:`~kdbench.results.queries`
(store state, listings, shared SQL), :mod:`~kdbench.results.leaderboard` (leaderboard, fidelity vs
diversity), :mod:`~kdbench.results.detail` (one run), :mod:`~kdbench.results.compare` (two rows),
:mod:`~kdbench.results.export` (Markdown). Everything public is importable from ``kdbench.results``.

Statistics (the leaderboard protocol)
-------------------------------------
* Only ``status = 'finished'`` runs count. Failed runs are listed by :func:`failed_runs`.
* A leaderboard row is a *setting* (``runs.setting``, one objective with its parameters) of the
  ``distilled`` role, or a reference row: ``teacher`` and ``student-init`` (labelled by role).
* Suite versions are never mixed. Without an explicit version a suite is shown in its standard version
  (one without ``+overrides``, the label of quick runs) of the most recent finished run
  (:func:`default_version`).
* Per task, the reported **mean** is the mean over the run's sampling seeds first (one number
  per training-seed run), then the mean of those over the setting's runs.
* The **95 % CI** is a Student-t interval over *all* per-seed values of the setting
  (every training-seed run × sampling seed): ``mean ± t(0.975, n-1) · std / sqrt(n)``, with
  ``n`` the number of per-seed values and ``std`` their sample standard deviation (ddof=1). It
  treats sampling seeds as independent draws, so it mixes training- and sampling-seed noise;
  with a single value (``n = 1``: one run of a seed-free metric) ``std`` and the CI are NaN.
* The **average** column averages each (run, sampling seed) over the selected tasks first
  (only (run, seed) pairs that have every selected task), then applies the same statistics.
* **rank** orders the distilled settings by the average (or by the single task) with the
  metric's direction (:data:`LOWER_IS_BETTER`); reference rows are not ranked.
* **tied_with_best**: Welch's unequal-variance t-test of the row against the best row, on the
  same per-seed values (mean, std, n as above); True where it cannot reject equality at
  ``ALPHA = 0.05`` (p >= 0.05), and for the best row itself. Where the test is undefined
  (n < 2 on either side) the row counts as tied: the data cannot tell them apart.

The t distribution and Welch's test come from ``scipy.stats``.
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
from kdbench.results.export import to_markdown
from kdbench.results.leaderboard import COST_COLUMNS, fidelity_diversity, leaderboard, leaderboard_long
from kdbench.results.queries import (
    LEADERBOARD_ROLES,
    REFERENCE_ROLES,
    default_version,
    failed_runs,
    grad_similarity,
    grad_similarity_long,
    is_quick_version,
    list_metrics,
    list_runs,
    list_settings,
    list_suites,
    list_tasks,
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
    "list_tasks", "list_metrics", "list_settings", "list_runs", "failed_runs", "status_counts",
    "leaderboard_long", "leaderboard", "run_summary", "run_detail", "run_metrics", "teacher_run_for",
    "curves", "samples", "count_samples", "sample_seeds", "sample_tasks", "score_names",
    "compare", "prompts_differing_most",
    "fidelity_diversity", "grad_similarity", "grad_similarity_long", "to_markdown",
]
