"""Built-in distillation objectives: one module per objective, discovered automatically.

Each module declares its objective with ``@kdbench.registry.objective``; there is no list to
edit. Modules whose names start with ``_`` are skipped by discovery. See
docs/adding-an-objective.md.
"""
