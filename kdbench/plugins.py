"""Out-of-tree objectives: where kdbench looks for them and how one is imported.

Only places the user names are searched (an ``objectives/`` folder in the working directory is
never picked up by accident):

* installed packages declaring the ``kdbench.objectives`` entry-point group (``pyproject.toml``:
  ``[project.entry-points."kdbench.objectives"] my_loss = "my_pkg.losses"``);
* every ``*.py`` (not starting with ``_``) in the folders of ``$KDBENCH_PLUGIN_PATH``
  (``os.pathsep``-separated): dropping a file there is enough to add an objective;
* a file named where an objective is asked for, as ``path/to/file.py:name``.

This module finds and imports. Registering what a plug-in declares, and undoing a plug-in that
fails half-way, is the registry's part (kdbench/registry.py); nothing here imports it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

from kdbench.objective_spec import ObjectiveError

ENTRY_POINT_GROUP = "kdbench.objectives"
PLUGIN_PATH_VAR = "KDBENCH_PLUGIN_PATH"
_MODULE_PREFIX = "_kdbench_plugin_"

#: Plug-in files imported so far (resolved path -> module): a file is imported once per process.
_modules: dict[str, types.ModuleType] = {}


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """Installed plug-ins (monkeypatched in tests)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def plugin_dirs() -> list[Path]:
    """The folders named in ``$KDBENCH_PLUGIN_PATH``. A named folder that does not exist is an
    error (a typo must not pass silently)."""
    out = []
    for part in os.environ.get(PLUGIN_PATH_VAR, "").split(os.pathsep):
        if not part.strip():
            continue
        p = Path(part.strip()).expanduser()
        if not p.is_dir():
            why = "is not a directory" if p.exists() else "does not exist"
            raise ObjectiveError(f"${PLUGIN_PATH_VAR} names {str(p)!r}, which {why}")
        out.append(p)
    return out


def plugin_files(dirs: list[Path]) -> list[Path]:
    """The plug-in files of ``dirs``, in a fixed order (by folder, then name)."""
    return [path for folder in dirs for path in sorted(folder.glob("*.py")) if not path.name.startswith("_")]


def one_line(exc: BaseException) -> str:
    """A failure as one line: the message, with the exception type unless it is ours."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ObjectiveError):
        return text
    if isinstance(exc, SystemExit):  # 'SystemExit: 0' says less than what happened
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_file(path: str | Path) -> types.ModuleType:
    """Import the Python file ``path`` once per process (as a module of its own, under a name
    made from its resolved path) and return the module. Its ``@objective`` declarations register
    as it runs; a file that fails to import raises :class:`ObjectiveError` and leaves no module
    behind (the caller undoes what it registered)."""
    p = Path(path).expanduser()
    if not p.is_file():
        why = "is a directory, not a file" if p.is_dir() else "not found"
        raise ObjectiveError(f"objective plugin file {why}: {str(path)!r}")
    key = str(p.resolve())
    module = _modules.get(key)
    if module is not None:
        return module
    stem = re.sub(r"\W", "_", p.stem)
    name = f"{_MODULE_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:10]}_{stem}"
    spec = importlib.util.spec_from_file_location(name, key)
    if spec is None or spec.loader is None:
        raise ObjectiveError(f"cannot import objective plugin file {key!r}")
    module = importlib.util.module_from_spec(spec)
    module.__kdbench_plugin_path__ = key
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):  # the user's Ctrl-C, not the plug-in's failure
            raise
        # SystemExit too: a plug-in's sys.exit(0) must not end `kdbench run` with success, doing nothing
        raise ObjectiveError(f"objective plugin file {key!r} failed to import: {one_line(exc)}") from None
    _modules[key] = module
    return module
