"""kdbench: benchmark and evaluation harness for knowledge-distillation objectives for LLMs.

Where things live:
  kdbench/registry.py      objectives registry (objectives/ beside kdbench/, installed as
                           kdbench.objectives, holds one module per objective)
  kdbench/suites/          versioned suite specs (teacher, student, data, budget, evaluation)
  kdbench/data/            where data comes in (embedded micro data, paper-suite loaders)
  kdbench/models.py        teacher asset, student construction
  kdbench/engine/trainer.py  the training loop: where the loss is computed (losses.py: the tensor math)
  kdbench/evaluation/      decoding, scoring, the evaluation protocol (metrics in kdbench/metrics/)
  kdbench/store/           where results are written (SQLAlchemy run store: models, schema, writer)
  kdbench/recipe.py        one run end to end (DistillRun); kdbench/cli.py the commands (cli_parser.py their options)
  leaderboard_app/app.py   Streamlit leaderboard over the store
"""

__version__ = "0.1.0"
