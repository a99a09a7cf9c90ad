"""A suite with an open task and an exact-answer task (micro v3: chatterbot + trivia): a metric is read
on the tasks whose headline it is, not averaged with a task scored by another headline."""

from __future__ import annotations

from kdbench.results import leaderboard, leaderboard_markdown
from kdbench.results.paired import resolution
from kdbench.results.queries import metric_tasks
from kdbench.store import RunWriter, open_engine

SUITE, VERSION = "micro", "3"
TASKS = [{"name": "chatterbot", "kind": "open"}, {"name": "trivia", "kind": "exact"}]
# (role, rougeL on chatterbot, rougeL on trivia, trivia accuracy)
ROWS = [("teacher", 14.0, 18.0, 14.0), ("student-init", 3.0, 1.0, 0.0), ("kl", 10.0, 40.0, 2.0),
        ("rkl", 12.0, 2.0, 1.0)]


def _store(path, tasks=TASKS):
    engine = open_engine(str(path))
    for role, chat, triv, acc in ROWS:
        distilled = role not in ("teacher", "student-init")
        w = RunWriter.start(engine, role="distilled" if distilled else role, suite=SUITE, suite_version=VERSION,
                            seed=0, config={"suite": {"name": SUITE, "tasks": tasks}}, provenance={},
                            objective=role if distilled else None, setting=role)
        w.metrics([("chatterbot", "rougeL", chat + d, s) for s, d in ((10, -1.0), (20, 0.0), (30, 1.0))]
                  + [("chatterbot", "teacher_logprob", -chat / 4, s) for s in (10, 20, 30)]
                  + [("trivia", "rougeL", triv, None), ("trivia", "accuracy", acc, None),
                     ("trivia", "teacher_logprob", -1.0, None)])
        w.samples([{"task": "chatterbot", "prompt_id": f"p{p}", "seed": s, "prompt": f"prompt {p}", "output": "o",
                    "reference": ["r"], "scores": {"rougeL": chat + (p - 1) + (s - 20) / 10}}
                   for p in range(3) for s in (10, 20, 30)]
                  + [{"task": "trivia", "prompt_id": f"q{p}", "seed": None, "prompt": f"question {p}", "output": "a",
                      "reference": ["a"], "scores": {"rougeL": triv + p, "accuracy": acc}} for p in range(3)])
        w.finish(wall_time_s=1.0)
    return engine


def test_a_metric_is_read_on_the_tasks_it_heads(tmp_path):
    engine = _store(tmp_path / "runs.db")
    assert metric_tasks(engine, SUITE, None, "rougeL") == ["chatterbot"]
    assert metric_tasks(engine, SUITE, None, "accuracy") == ["trivia"]
    # no task's headline: the tasks of the headline task's kind
    assert metric_tasks(engine, SUITE, None, "teacher_logprob") == ["chatterbot"]


def test_the_rouge_leaderboard_is_the_open_tasks_not_an_average_with_trivia(tmp_path):
    engine = _store(tmp_path / "runs.db")
    lb = leaderboard(engine, SUITE, "rougeL")
    assert list(lb.attrs["tasks"]) == ["chatterbot"]
    # averaged with trivia, kl (10 + 40) would rank above rkl (12 + 2); on the headline task rkl leads
    best = lb[lb.role == "distilled"].sort_values("rank").setting.iloc[0]
    assert best == "rkl"
    md = leaderboard_markdown(engine, SUITE, "rougeL")
    assert "| trivia |" not in md.splitlines()[0] and "Avg." not in md.splitlines()[0]
    assert resolution(engine, SUITE, None, None, "rougeL")["tasks"] == ["chatterbot"]
    # a task named explicitly is still read
    assert list(leaderboard(engine, SUITE, "rougeL", ["trivia"]).attrs["tasks"]) == ["trivia"]


def test_without_a_stored_task_spec_every_task_having_the_metric_is_read(tmp_path):
    engine = _store(tmp_path / "runs.db", tasks=None)
    assert metric_tasks(engine, SUITE, None, "rougeL") == ["chatterbot", "trivia"]


def test_a_runs_report_pairs_each_task_on_its_own_headline(tmp_path):
    from kdbench.report import paired_lines
    from kdbench.store import Run
    from tests.fixtures_store import rows

    engine = _store(tmp_path / "runs.db")
    kl = next(r for r in rows(tmp_path / "runs.db", Run) if r.setting == "kl")
    heads = [line.split(",")[0] for line in paired_lines(engine, kl.id) if not line.startswith(" ")]
    assert heads == ["chatterbot rougeL", "trivia accuracy"]
