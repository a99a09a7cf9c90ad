"""Built-in distillation objectives: one module per objective, discovered automatically.

This folder is the package ``kdbench.objectives`` (pyproject.toml maps it with package-dir) and
is imported under that name only, so an ``objectives/`` folder elsewhere never stands in for it.

Each module declares its objective with ``@kdbench.registry.objective``; there is no list to
edit. Modules whose names start with ``_`` are skipped by discovery. See
docs/adding-an-objective.md.
"""
