"""The docs run as written.

* Every ```python block of README.md and docs/*.md is executed, each in a fresh interpreter (a
  fresh namespace and a fresh objective registry) in a temporary working directory, offline,
  with the tests' cache. A block that cannot run here (it needs a full suite run) is marked in
  its doc on the line right above it with ``<!-- docs-test: skip (why) -->`` and must be listed
  by name, with that reason, in ``SKIPPED`` below: it is then reported as skipped, never run,
  and never skipped silently (a marker missing from the list, or listed without a marker, fails).
* docs/adding-an-objective.md works verbatim for a newcomer: its example objective file, written
  as given, runs through ``kdbench run --objective path/to/sqprob.py:sqprob --param scale=2`` (the
  doc's own command line) on a tiny world, and its Python blocks find it as the doc says.
* docs/sweeps.md's example specification passes the sweep's strict validation.
* README.md's "Layout" block names every module of kdbench/.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Blocks that are not executed: name -> the reason the doc's marker gives (kept in step with the
# docs by test_skip_markers_match_the_list). None today: every Python block runs.
SKIPPED: dict[str, str] = {}

# docs/adding-an-objective.md §1: the example objective file, and where the doc later names it
EXAMPLE_FILE_BLOCK = "docs/adding-an-objective.md#1-write-the-file-1"
EXAMPLE_FILE_PATH = "path/to/sqprob.py"

SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<why>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    name: str          # doc#section-slug-k: the k-th block of that language under that heading
    doc: str           # path relative to the repository root
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None   # the reason of a docs-test skip marker right above it


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def fenced_blocks(text: str, doc: str) -> list[Block]:
    """Every fenced block of a markdown text, named by its heading and position."""
    lines = text.splitlines()
    out: list[Block] = []
    section, counts = "top", {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = _slug(line.lstrip("#"))
        m = FENCE.match(line)
        if m is None:
            i += 1
            continue
        start, lang = i, m.group("lang")
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_MARKER.match(above.strip())
        key = (section, lang)
        counts[key] = counts.get(key, 0) + 1
        out.append(Block(f"{doc}#{section}-{counts[key]}" if lang == "python" else f"{doc}#{section}-{lang}-{counts[key]}",
                         doc, start + 1, lang, "\n".join(body) + "\n", marker.group("why") if marker else None))
    return out


def all_blocks(lang: str) -> list[Block]:
    return [b for p in DOCS for b in fenced_blocks(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
            if b.lang == lang]


PYTHON_BLOCKS = all_blocks("python")


def block(name: str) -> Block:
    found = [b for b in PYTHON_BLOCKS + all_blocks("bash") + all_blocks("yaml") if b.name == name]
    assert found, f"no block {name!r} in the docs (was the section renamed? update this test)"
    return found[0]


def env(**extra: str) -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("KDBENCH_DB", "KDBENCH_PLUGIN_PATH", "KDBENCH_DATA_DIR"):
        if key not in extra:
            e.pop(key, None)
    return e


def run(argv: list[str], cwd: Path, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def write_example_file(root: Path) -> Path:
    """The example objective file of docs/adding-an-objective.md, byte for byte as the doc gives it."""
    path = root / EXAMPLE_FILE_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block(EXAMPLE_FILE_BLOCK).code, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ the extractor


def test_extractor_names_blocks_and_reads_skip_markers():
    text = textwrap.dedent("""\
        # Title

        ```python
        a = 1
        ```

        ## Use it

        <!-- docs-test: skip (needs a full micro run: 5 min) -->

        ```python
        run_everything()
        ```

        ```bash
        kdbench list
        ```
        """)
    blocks = fenced_blocks(text, "docs/x.md")
    assert [(b.name, b.lang, b.line, b.skip) for b in blocks] == [
        ("docs/x.md#title-1", "python", 3, None),
        ("docs/x.md#use-it-1", "python", 11, "needs a full micro run: 5 min"),
        ("docs/x.md#use-it-bash-1", "bash", 15, None)]
    assert blocks[0].code == "a = 1\n"


def test_skip_markers_match_the_list():
    """Every skipped block is named here with its doc's reason, and only those are skipped."""
    marked = {b.name: b.skip for b in PYTHON_BLOCKS if b.skip is not None}
    assert marked == SKIPPED, ("docs-test skip markers and SKIPPED differ; a block is skipped only by name, "
                               f"with the reason its marker gives: docs {marked}, test {SKIPPED}")


def test_there_are_python_blocks_to_run():
    names = {b.name for b in PYTHON_BLOCKS}
    assert EXAMPLE_FILE_BLOCK in names, sorted(names)
    assert len(PYTHON_BLOCKS) >= 5, sorted(names)


# ------------------------------------------------------------------------- every Python block


@pytest.mark.parametrize("blk", PYTHON_BLOCKS, ids=[b.name for b in PYTHON_BLOCKS])
def test_python_block_runs(blk: Block, tmp_path):
    if blk.skip is not None:
        pytest.skip(f"{blk.name} (line {blk.line}): {blk.skip}")
    extra = {}
    if blk.doc == "docs/adding-an-objective.md":
        # The doc's world: its example objective, as given, at the path §4 names. §2 uses it by
        # name after §1 put it in objectives/; $KDBENCH_PLUGIN_PATH (§4) stands in for
        # that here, so the shared source tree is never written to.
        extra["KDBENCH_PLUGIN_PATH"] = str(write_example_file(tmp_path).parent)
    script = tmp_path / "block.py"
    script.write_text(blk.code, encoding="utf-8")
    proc = run([sys.executable, str(script)], tmp_path, **extra)
    assert proc.returncode == 0, (f"{blk.name} (line {blk.line}) failed, exit {proc.returncode}:\n{blk.code}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


def test_python_blocks_pass_the_linter(tmp_path):
    """The docs' code is held to the rules of the code (pyproject.toml [tool.ruff])."""
    for i, blk in enumerate(PYTHON_BLOCKS):
        (tmp_path / f"block_{i:02d}.py").write_text(blk.code, encoding="utf-8")
    proc = run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                "--output-format", "concise", str(tmp_path)], tmp_path, timeout=120)
    names = {f"block_{i:02d}.py": b.name for i, b in enumerate(PYTHON_BLOCKS)}
    report = re.sub(r"\S*(block_\d\d\.py)", lambda m: names[m.group(1)], proc.stdout + proc.stderr)
    assert proc.returncode == 0, report


# ------------------------------------------------ docs/adding-an-objective.md for a newcomer


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """The tiny teacher / student pair and a gsm8k folder with enough examples for a batch."""
    try:
        from tests.bad_input_world import GSM_TRAIN, _gsm8k, tiny_run_flags
        from tests.tiny_models import make_tiny_pair
    except ImportError:  # run from inside tests/
        from bad_input_world import GSM_TRAIN, _gsm8k, tiny_run_flags
        from tiny_models import make_tiny_pair

    root = tmp_path_factory.mktemp("docs-world")
    teacher, student = make_tiny_pair(root / "models")
    data = _gsm8k(root / "data", train=[{**r, "question": f"{r['question']} ({k})"}
                                        for k in range(3) for r in GSM_TRAIN])
    return tiny_run_flags(teacher, student, data)


def test_adding_an_objective_runs_through_kdbench_run(tiny_world, tmp_path):
    """The doc's example file, written as given, run by the doc's own command line."""
    write_example_file(tmp_path)
    commands = [shlex.split(line) for b in all_blocks("bash") if b.doc == "docs/adding-an-objective.md"
                for line in b.code.splitlines() if f"--objective {EXAMPLE_FILE_PATH}:" in line]
    assert commands, "docs/adding-an-objective.md no longer shows the kdbench run command line of its example"
    argv = commands[0]
    assert argv[:2] == ["kdbench", "run"], argv
    db = tmp_path / "runs.db"
    proc = run([sys.executable, "-m", "kdbench", *argv[1:], *tiny_world, "--db", str(db)], tmp_path, timeout=600)
    assert proc.returncode == 0, f"{argv} on the tiny world: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    from kdbench.store import Run, open_engine
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    engine = open_engine(str(db), readonly=True)
    try:
        with Session(engine) as s:
            runs = s.scalars(select(Run).where(Run.objective == "sqprob")).all()
            assert [(r.setting, r.status) for r in runs] == [("sqprob(scale=2.0,target=T)", "finished")]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- docs/sweeps.md


def test_sweeps_example_specification_is_valid(tmp_path):
    """The doc's YAML specification passes `validate` and expands (what `--dry-run` lists)."""
    from kdbench.sweep_spec import SweepSpec, expand

    (yaml_block,) = [b for b in all_blocks("yaml") if b.doc == "docs/sweeps.md"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml_block.code, encoding="utf-8")
    jobs = expand(SweepSpec.from_yaml(path))
    assert jobs and len({j.key for j in jobs}) == len(jobs)


# ------------------------------------------------------------------------------ README layout


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Layout\b.*?^```\n(?P<body>.*?)^```", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section with a code block"
    return m.group("body")


def layout_regions(layout: str) -> dict[str, str]:
    """The folders the block lists as a tree, each with the text of its region: ``{"kdbench": ...,
    "kdbench/engine": ...}``. A folder is listed as a tree when lines indented two more than its
    own line follow it (deeper lines continue a description, they are no children)."""
    regions: dict[str, list[str]] = {}
    trees: set[str] = {"kdbench"}
    stack: list[tuple[int, str]] = []  # (indent, folder path)
    for line in layout.splitlines():
        if not line.strip():
            continue
        indent, first = len(line) - len(line.lstrip()), line.split()[0]
        while stack and indent <= stack[-1][0]:
            stack.pop()
        if stack and indent == stack[-1][0] + 2:
            trees.add(stack[-1][1])  # a child line: the folder is listed as a tree
        if first.endswith("/") and (not stack or indent == stack[-1][0] + 2):
            stack.append((indent, f"{stack[-1][1]}/{first[:-1]}" if stack else first[:-1]))
            regions[stack[-1][1]] = []
        for _, path in stack:  # a folder's region holds its descendants' lines too
            regions[path].append(line)
    return {k: "\n".join(v) for k, v in regions.items() if k in trees}


def unnamed_modules(layout: str, package: Path = ROOT / "kdbench") -> list[str]:
    """Modules of kdbench/ the Layout block does not name: a module is covered by its file name
    (``x.py``) or its package's (``x/``); in a folder the block lists as a tree (kdbench/ itself,
    engine/, ...), each of its modules and packages must be named in that folder's lines.
    ``__init__.py`` and ``__main__.py`` aside."""
    regions = layout_regions(layout)
    missing: list[str] = []

    def modules(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
                      or (p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))))

    def visit(folder: Path) -> None:
        rel = folder.relative_to(package.parent).as_posix()
        if rel not in regions:
            return  # named as a whole (checked by its parent), not listed file by file
        words = set(re.findall(r"[\w.]+/?", regions[rel]))
        for p in modules(folder):
            if (p.name + "/" if p.is_dir() else p.name) not in words:
                missing.append(p.relative_to(package.parent).as_posix() + ("/" if p.is_dir() else ""))
            elif p.is_dir():
                visit(p)

    visit(package)
    return missing


def test_unnamed_modules_rule(tmp_path):
    layout = textwrap.dedent("""\
        kdbench/
          a.py  pkg/  b.py   (pkg/ holds x.py, y.py)
          expanded/         the one listed file by file:
                            one.py ... (a description going on)
            one.py
            sub/            named, not listed
        leaderboard_app/    c.py
        """)
    root = tmp_path / "kdbench"
    for rel in ("__init__.py", "__main__.py", "a.py", "b.py", "c.py", "pkg/__init__.py", "pkg/x.py", "pkg/z.py",
                "expanded/__init__.py", "expanded/one.py", "expanded/two.py", "expanded/sub/q.py",
                "other/__init__.py", "data/x.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    assert set(layout_regions(layout)) == {"kdbench", "kdbench/expanded"}
    assert unnamed_modules(layout, root) == ["kdbench/c.py", "kdbench/expanded/two.py", "kdbench/other/"]


def test_readme_layout_names_every_module():
    missing = unnamed_modules(layout_block())
    assert not missing, "README.md's Layout block does not name: " + ", ".join(missing)


def test_readme_layout_names_no_module_that_is_gone():
    """The other direction: every ``x.py`` the block names exists (a moved module is renamed there)."""
    files = {p.name for folder in ("kdbench", "leaderboard_app", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    # file names only: not path/to/x.py, not the file.py:name form of a plug-in
    stale = sorted(set(re.findall(r"(?<![\w./])[\w.]+\.py\b(?!:)", layout_block())) - files)
    assert not stale, "README.md's Layout block names modules that do not exist: " + ", ".join(stale)
