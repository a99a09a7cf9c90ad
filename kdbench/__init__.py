"""kdbench: benchmark and evaluation harness for knowledge-distillation objectives for LLMs.

Where things live:
  kdbench/registry.py      objectives registry (objectives/ holds one module per objective)
  kdbench/suites.py        versioned suite specs (teacher, student, data, budget, evaluation)
  kdbench/data/            where data comes in (embedded micro data, paper-suite loaders)
  kdbench/models.py        teacher asset, student construction
  kdbench/train.py         the distillation loop: where the loss is computed
  kdbench/evaluate.py      sampling and scoring (metrics in kdbench/metrics/)
  kdbench/store.py         where results are written (SQLAlchemy run store)
  kdbench/runner.py        one run end to end; kdbench/cli.py the command line
  leaderboard_app/app.py   Streamlit leaderboard over the store
"""

__version__ = "0.1.0"
