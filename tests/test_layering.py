"""The import graph of kdbench keeps its layers: no import cycle, no upward import, and
evaluation (``kdbench/evaluation/``) imports nothing from the training engine (``kdbench/engine/``).

The graph is read with ``ast`` from every ``kdbench/**/*.py`` and ``objectives/*.py`` (the
package ``kdbench.objectives``, see :data:`SOURCES`): module-level imports, imports inside
functions (a lazy import that hides a cycle is still a cycle) and ``TYPE_CHECKING`` imports
alike. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
to ``pkg``. Dynamic imports (``importlib.import_module``: the registry's discovery of
``objectives/``, plug-ins) are not read.

:data:`LAYERS` is the table, lowest first; docs/engine.md ("Layers") shows the same table with
the reasons. A module may import modules of its own layer (the cycle test keeps those acyclic)
and of lower layers, nothing above. Every module must be in the table: a new module is placed
on purpose, not by default.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdbench"
#: Source folder of each installed package, as pyproject.toml's package-dir maps them: the
#: built-in objectives sit beside kdbench/ and are imported only as ``kdbench.objectives``.
SOURCES: dict[str, Path] = {"kdbench": PACKAGE, "kdbench.objectives": ROOT / "objectives"}

#: (layer, module prefixes), lowest first. A prefix names a module or a whole package
#: (``kdbench.store`` is ``store/`` and everything in it); ``kdbench`` alone is the package's
#: ``__init__`` (its version).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Leaves: no kdbench import above them. diskcache is under every on-disk cache (cache root,
    # lock, publish-by-rename, mark-used, list / clear, digests).
    ("foundation", ("kdbench", "kdbench.errors", "kdbench.secrets", "kdbench.numerics", "kdbench.allocator",
                    "kdbench.device", "kdbench.distributed", "kdbench.provenance", "kdbench.diskcache", "kdbench.metrics")),
    ("suites", ("kdbench.suites",)),
    # Where data comes in, and its shapes (data/batching.py: Encoded, Batch, pack); tasks/ are the
    # lm-eval assets built from the data.
    ("data", ("kdbench.data", "kdbench.tasks")),
    # The results store and its read side (results/, report.py); lifecycle: heartbeat, gc.
    ("store", ("kdbench.store", "kdbench.lifecycle", "kdbench.results", "kdbench.report")),
    # Model plumbing both training and evaluation need: hidden states at counted positions, THE
    # output-head accessor, StudentBody (modeling.py); loading and building models (models.py).
    # Below the objective layer, because an objective takes a head (``from_hidden``).
    ("modeling", ("kdbench.modeling", "kdbench.models")),
    ("objective", ("kdbench.objective_spec", "kdbench.plugins", "kdbench.losses", "kdbench.objective",
                   "kdbench.registry", "kdbench.objectives", "kdbench.catalogue")),
    # Decoding, scoring, the evaluation protocol, the teacher's prompt cache. Below the engine:
    # training may sample through evaluation's decoder (on-policy), evaluation never imports engine/.
    ("evaluation", ("kdbench.evaluation",)),
    ("engine", ("kdbench.engine",)),
    # What a suite's runs share: prepared assets, the fine-tuned teacher, the reference rows.
    ("pipeline", ("kdbench.prepare", "kdbench.finetune", "kdbench.references")),
    # One request end to end, and the commands' machinery.
    ("spine", ("kdbench.run_option", "kdbench.config", "kdbench.cli_parser", "kdbench.recipe", "kdbench.sweep_spec",
               "kdbench.sweep", "kdbench.resumption", "kdbench.analyze", "kdbench.lmeval")),
    ("commands", ("kdbench.cli", "kdbench.__main__")),
]

#: Walls inside the order: (importer prefix, imported prefix) pairs that must never appear,
#: whatever the layers allow.
WALLS = [("kdbench.evaluation", "kdbench.engine")]


def module_files(sources: dict[str, Path] | None = None) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under each folder of ``sources`` (package
    name -> folder; :data:`SOURCES` by default). A name found in two folders is an error: a
    stale ``kdbench/objectives/`` would shadow the real one at import time."""
    out: dict[str, Path] = {}
    for name, folder in (SOURCES if sources is None else sources).items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join([name, *parts])
            if module in out:
                raise AssertionError(f"{module} is both {out[module].relative_to(ROOT)} and {path.relative_to(ROOT)}")
            out[module] = path
    return out


def _enclosing_functions(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function (lazy imports)."""
    inside: set[int] = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                inside.add(id(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return inside


def imports_of(module: str, source: str, modules, is_package: bool) -> list[tuple[str, int, bool]]:
    """``(imported kdbench module, line, inside a function)`` for every import in ``source``."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    tree = ast.parse(source)
    lazy = _enclosing_functions(tree)
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        for target in targets:
            found = known(target) if target.split(".")[0] == "kdbench" else None
            if found and found != module:
                out.append((found, node.lineno, id(node) in lazy))
    return out


def import_graph(sources: dict[str, Path] | None = None) -> dict[str, list[tuple[str, int, bool]]]:
    files = module_files(sources)
    return {m: imports_of(m, p.read_text(encoding="utf-8"), files, p.name == "__init__.py") for m, p in files.items()}


def layer_of(module: str) -> int | None:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p if p == "kdbench" else (module == p or module.startswith(p + "."))
            if hit and len(p) > best:
                best, index = len(p), i
    return index


def where(module: str, line: int, lazy: bool, files) -> str:
    return f"{files[module].relative_to(ROOT)}:{line}" + (" (inside a function)" if lazy else "")


def upward_imports(graph) -> list[str]:
    files = module_files()
    bad = []
    for m, edges in graph.items():
        for target, line, lazy in edges:
            lm, lt = layer_of(m), layer_of(target)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{where(m, line, lazy, files)}: {m} ({LAYERS[lm][0]}) imports {target} ({LAYERS[lt][0]})")
    return bad


def wall_breaches(graph) -> list[str]:
    files = module_files()
    return [f"{where(m, line, lazy, files)}: {m} imports {target}"
            for m, edges in graph.items() for target, line, lazy in edges for a, b in WALLS
            if (m == a or m.startswith(a + ".")) and (target == b or target.startswith(b + "."))]


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    succ = {m: sorted({t for t, _, _ in edges if t in graph}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    component.append(x)
                    if x == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    unplaced = [m for m in graph if layer_of(m) is None]
    assert not unplaced, "modules in no layer of LAYERS (place them there and in docs/engine.md): " + ", ".join(unplaced)


def test_no_module_imports_a_higher_layer(graph):
    bad = upward_imports(graph)
    assert not bad, "imports that climb a layer:\n" + "\n".join(bad)


def test_evaluation_imports_nothing_from_the_engine(graph):
    bad = wall_breaches(graph)
    assert not bad, "imports through a wall:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles (strongly connected modules):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_reader_sees_every_kind_of_import():
    """What the tests above rely on: lazy, TYPE_CHECKING, relative and ``from pkg import module``
    imports are all edges; a cycle and an upward import are found."""
    modules = {"kdbench", "kdbench.engine", "kdbench.engine.trainer", "kdbench.evaluation",
               "kdbench.evaluation.decoder", "kdbench.errors"}
    source = ("from typing import TYPE_CHECKING\nimport torch\nfrom .. import errors as _e\n"
              "if TYPE_CHECKING:\n    from kdbench.engine import trainer\n"
              "def f():\n    import kdbench.errors\n    from kdbench.evaluation.decoder import Decoder\n")
    got = imports_of("kdbench.evaluation.protocol", source, modules, False)
    assert sorted(got) == [("kdbench.engine.trainer", 5, False), ("kdbench.errors", 3, False),
                           ("kdbench.errors", 7, True), ("kdbench.evaluation.decoder", 8, True)]
    fake = {"kdbench.evaluation.decoder": [("kdbench.engine.trainer", 1, True)],
            "kdbench.engine.trainer": [("kdbench.evaluation.decoder", 2, False)]}
    assert cycles(fake) == [["kdbench.engine.trainer", "kdbench.evaluation.decoder"]]
    assert layer_of("kdbench.engine.trainer") > layer_of("kdbench.evaluation.decoder") > layer_of("kdbench.errors")
    assert layer_of("kdbench") == 0 and layer_of("kdbench.nowhere") is None


def test_docs_show_the_same_table():
    """docs/engine.md ("Layers") lists the layers of :data:`LAYERS`, lowest first, each with its
    modules (``errors``, ``store/``, ``kdbench/__init__``)."""
    text = (ROOT / "docs" / "engine.md").read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    documented = []
    for row in rows:
        names = re.findall(r"`([^`]+)`", row[3])
        documented.append((row[2].strip(), tuple(
            "kdbench" if n == "kdbench/__init__" else "kdbench." + n.rstrip("/").replace("/", ".") for n in names)))
    assert documented == [(name, tuple(p)) for name, p in LAYERS]


def test_importing_evaluation_loads_no_engine_module():
    """At run time too (package ``__init__`` files included): the evaluation protocol, decoder
    and prompt cache load nothing from engine/."""
    code = ("import sys; import kdbench.evaluation.protocol, kdbench.evaluation.prompt_cache; "
            "print(sorted(m for m in sys.modules if m.startswith('kdbench.engine')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pyproject_installs_every_package_from_its_folder():
    """pyproject.toml lists packages by hand (a folder mapped by package-dir is out of
    packages.find's sight): the list must be exactly the package folders, so a new one is not
    left out of the wheel, and package-dir must map each folder of :data:`SOURCES` as read here."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {**SOURCES, "leaderboard_app": ROOT / "leaderboard_app"}
    packages = {m for m, p in module_files(folders).items() if p.name == "__init__.py"}
    assert sorted(conf["packages"]) == sorted(packages)
    assert conf["package-dir"] == {name: folder.relative_to(ROOT).as_posix()
                                   for name, folder in SOURCES.items() if name != "kdbench"}
    assert not (PACKAGE / "objectives").exists(), "kdbench/objectives/ would shadow objectives/ at import time"
