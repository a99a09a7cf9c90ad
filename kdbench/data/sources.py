"""Where a suite's data comes in: one builder per ``suite.data["loader"]``.

A builder returns :class:`SuiteData` -- training and validation examples and, per data-source
key (``TaskSpec.source``), the test examples -- plus a manifest saying where each part came
from, which a run stores with every result.

Paper suites read a **data root** (``--data-dir``, else ``$KDBENCH_DATA_DIR``) laid out like
``../shared/data`` (MiniLLM-processed instruction sets, GSM8K, DialogSum, Multi30k; see
docs/suites.md). For each source the first file found wins; files after the first are
*stand-ins* (e.g. ``dolly/dev.jsonl``, 1,000 examples, for the ~14k Dolly training split the
shared data lacks): a run that used one is filed under ``version+data=standin``. Without a data
root every source is loaded from its hub name through the loaders' hub path
(kdbench/data/loaders.py); offline that fails with a one-line error.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.data import loaders as L
from kdbench.errors import UserError

# Test sets never leak into training: train / valid examples whose normalised prompt equals a
# test prompt of the same suite are dropped (counted in the manifest).


@dataclass(frozen=True)
class Source:
    """One data source: local candidates (relative to the data root; later ones are stand-ins)
    and the hub fallback. ``load(path_or_name, hub)`` returns examples."""

    local: tuple[str, ...]
    hub: str
    load: Callable[[str, bool], list]
    note: str = ""


def _minillm(task: str, hub_split: str = "validation"):
    def load(p, hub):
        return L.load_minillm_jsonl(p, task, split=hub_split) if hub else L.load_minillm_jsonl(p, task)
    return load


def _vicuna(p, hub):
    if str(p).endswith("alpaca_eval.json"):  # stand-in: AlpacaEval's 80 Vicuna questions, davinci-003 answers
        return L.load_alpaca_eval(p, task="vicuna", subset="vicuna")
    return _minillm("vicuna")(p, hub)


# Hub names of MiniLLM's processed sets are those of MiniLLM's README (MiniLLM/dolly, self-inst,
# Vicuna, sinst, uinst); their split layout cannot be checked offline -- prefer --data-dir.
SOURCES: dict[str, Source] = {
    "dolly_train": Source(("dolly/train.jsonl", "dolly/dev.jsonl"), "databricks/databricks-dolly-15k",
                          lambda p, hub: L.load_dolly_hf(p, split="train") if hub
                          else L.load_minillm_jsonl(p, "dolly_train")),
    "dolly_valid": Source(("dolly/dev.jsonl",), "", lambda p, hub: L.load_minillm_jsonl(p, "dolly_valid")),
    "dolly": Source(("dolly/valid.jsonl",), "MiniLLM/dolly", _minillm("dolly", "test")),
    "self_instruct": Source(("self_instruct/minillm/valid.jsonl",), "MiniLLM/self-inst", _minillm("self_instruct")),
    "vicuna": Source(("vicuna/minillm/valid.jsonl", "alpaca_eval/alpaca_eval.json"), "MiniLLM/Vicuna", _vicuna),
    "sni": Source(("sni/minillm/valid.jsonl",), "MiniLLM/sinst", _minillm("sni")),
    "unni": Source(("unni/minillm/11_/valid.jsonl", "unni/minillm/11_/valid.first20.jsonl"), "MiniLLM/uinst",
                   _minillm("unni")),
    "gsm8k_train": Source(("gsm8k/train.jsonl",), "openai/gsm8k", lambda p, hub: L.load_gsm8k("train" if hub else p)),
    "gsm8k": Source(("gsm8k/test.jsonl",), "openai/gsm8k", lambda p, hub: L.load_gsm8k("test" if hub else p)),
    "dialogsum_train": Source(("dialogsum/dialogsum.train.jsonl", "dialogsum/dialogsum.dev.jsonl"),
                              "knkarthick/dialogsum", lambda p, hub: L.load_dialogsum(p, split="train")),
    "dialogsum_valid": Source(("dialogsum/dialogsum.dev.jsonl",), "knkarthick/dialogsum",
                              lambda p, hub: L.load_dialogsum(p, split="validation")),
    "dialogsum": Source(("dialogsum/dialogsum.test.jsonl",), "knkarthick/dialogsum",
                        lambda p, hub: L.load_dialogsum(p, split="test")),
    "translation_train": Source(("translation/multi30k",), "bentrevett/multi30k",
                                lambda p, hub: L.load_multi30k(p, "train")),
    "translation_valid": Source(("translation/multi30k",), "bentrevett/multi30k",
                                lambda p, hub: L.load_multi30k(p, "validation" if hub else "val")),
    "translation": Source(("translation/multi30k",), "bentrevett/multi30k",
                          lambda p, hub: L.load_multi30k(p, "test")),
}


@dataclass
class SuiteData:
    train: list
    valid: list
    tests: dict[str, list]                     # TaskSpec.source -> examples
    manifest: dict = field(default_factory=dict)

    @property
    def standin(self) -> bool:
        return any(m.get("standin") for m in self.manifest.values() if isinstance(m, dict))


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir``, else ``$KDBENCH_DATA_DIR``, else None (hub names)."""
    d = data_dir or os.environ.get("KDBENCH_DATA_DIR")
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise UserError(f"data directory {p} does not exist (--data-dir / $KDBENCH_DATA_DIR)")
    return p


def locate(key: str, root: Path | None) -> dict:
    """Where a source will be read from, without reading it: {"path" | "hub", "standin"}."""
    src = SOURCES[key]
    if root is not None:
        for i, rel in enumerate(src.local):
            if (root / rel).exists():
                return {"path": str(root / rel), "standin": i > 0, "wanted": src.local[0]}
        return {"missing": [str(root / r) for r in src.local]}  # a data root is used whole, never mixed with the hub
    return {"hub": src.hub, "standin": False}


def load(key: str, root: Path | None) -> tuple[list, dict]:
    where = locate(key, root)
    if "missing" in where:
        raise UserError(f"data source {key!r} not found: none of {', '.join(where['missing'])}")
    src = SOURCES[key]
    try:
        examples = src.load(where.get("path") or src.hub, "hub" in where)
    except UserError:
        raise
    except Exception as exc:  # hub offline, missing file in a folder, schema errors
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load data source {key!r} from {where.get('path') or 'hub ' + src.hub}: {first}"
                        + ("; pass --data-dir" if "hub" in where else "")) from None
    if not examples:
        raise UserError(f"data source {key!r} ({where.get('path') or 'hub ' + src.hub}) has no examples")
    return examples, {**where, "n": len(examples)}


def norm_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def _by_hash(examples: list, salt: str = "kdbench") -> list:
    """A stable order independent of file order: sha256 of (salt, id)."""
    return sorted(examples, key=lambda e: hashlib.sha256(f"{salt}\0{e.id}".encode()).hexdigest())


def decontaminate(examples: list, tests: dict[str, list]) -> tuple[list, int]:
    seen = {norm_prompt(e.prompt) for exs in tests.values() for e in exs}
    kept = [e for e in examples if norm_prompt(e.prompt) not in seen]
    return kept, len(examples) - len(kept)


# ------------------------------------------------------------------------------------ builders


def _formatted(examples: list, fmt: str) -> list:
    """``fmt`` "alpaca": MiniLLM's Alpaca-style prompt (trailing newline dropped: the prompt
    builder adds it back for tokenizers without a chat template); "plain": unchanged."""
    if fmt != "alpaca":
        return examples
    import dataclasses

    return [dataclasses.replace(e, prompt=e.meta.get("alpaca_prompt", L.alpaca_prompt(e.prompt)).rstrip("\n"))
            for e in examples]


def _split_pool(pool: list, n_valid: int, n_train: int | None) -> tuple[list, list]:
    """Validation and training examples from one pool (a stand-in, a raw hub set, GSM8K's train):
    validation gets ``n_valid`` but never more than a fifth of the pool."""
    pool = _by_hash(pool)
    n_valid = min(n_valid, len(pool) // 5)
    valid = pool[:n_valid]
    return pool[n_valid:] if n_train is None else pool[n_valid:n_valid + n_train], valid


def _clean(pool: list, tests: dict, manifest: dict, key: str) -> list:
    """``pool`` without examples whose prompt is a test prompt (before any split, so sizes are exact)."""
    kept, dropped = decontaminate(pool, tests)
    manifest.setdefault("decontaminated", {})[key] = dropped
    return kept


def _finish(suite, train, valid, tests, manifest) -> SuiteData:
    fmt = suite.data.get("prompt", "plain")
    manifest.update(sizes={"train": len(train), "valid": len(valid)}, prompt=fmt)
    return SuiteData(_formatted(train, fmt), _formatted(valid, fmt),
                     {k: _formatted(v, fmt) for k, v in tests.items()}, manifest)


def build_micro(suite, root) -> SuiteData:
    from kdbench.data.micro import build_splits

    s = build_splits(suite.data["valid_frac"], suite.data["test_frac"])
    # Closed-book categories (trivia: "Galileo was the citizen of which country?") are trained on
    # like the rest but scored apart, as the exact-answer source "closed_book": a short factual
    # answer is an exact match or nothing, and mixed into the open task's ROUGE-L it measured
    # the facts a cut-down student has lost, not the conversation it learned (docs/suites.md).
    closed = set(suite.data.get("closed_book", ()))
    is_open = [e for e in s["test"] if e.meta["category"] not in closed]
    tests = {"test": is_open}
    if closed:
        tests["closed_book"] = [e for e in s["test"] if e.meta["category"] in closed]
    valid = [e for e in s["valid"] if e.meta["category"] not in closed]  # selection uses the headline task
    manifest = {"corpus": "chatterbot-corpus (PyPI)", "closed_book": sorted(closed)}
    return SuiteData(s["train"], valid, tests, manifest)


def build_micro_task(suite, root) -> SuiteData:
    from kdbench.data.micro_task import build_splits

    s = build_splits()
    return SuiteData(s["train"], s["valid"], {"test": s["test"]}, {"corpus": "chatterbot-corpus (PyPI) sentences"})


def build_paper_instruct(suite, root) -> SuiteData:
    """Train on Dolly, validate on Dolly valid, test on the five sets of the tasks."""
    manifest, tests = {}, {}
    for t in suite.tasks:
        tests[t.source], manifest[t.source] = load(t.source, root)
    n_valid = suite.data.get("valid_size", suite.eval.n_valid)
    pool, manifest["dolly_train"] = load("dolly_train", root)
    pool = _clean(pool, tests, manifest, "dolly_train")
    if "hub" in manifest["dolly_train"] or manifest["dolly_train"]["standin"]:
        train, valid = _split_pool(pool, n_valid, None)  # raw hub set or the dev stand-in: split off valid
    else:
        train = pool
        valid_all, manifest["dolly_valid"] = load("dolly_valid", root)
        valid = _by_hash(_clean(valid_all, tests, manifest, "dolly_valid"))[:n_valid]
    return _finish(suite, train, valid, tests, manifest)


def _task_builder(key: str):
    def build(suite, root) -> SuiteData:
        (task,) = suite.tasks
        manifest = {}
        test, manifest[key] = load(task.source, root)
        pool, manifest[f"{key}_train"] = load(f"{key}_train", root)
        pool = _clean(pool, {task.source: test}, manifest, f"{key}_train")
        n_train, n_valid = suite.data["n_train"], suite.eval.n_valid
        valid_key = f"{key}_valid"
        if valid_key in SOURCES and not manifest[f"{key}_train"].get("standin"):
            train = _by_hash(pool)[:n_train]
            valid_all, manifest[valid_key] = load(valid_key, root)
            valid = _by_hash(_clean(valid_all, {task.source: test}, manifest, valid_key))[:n_valid]
        else:  # no separate validation set (GSM8K), or a stand-in that must hold both
            train, valid = _split_pool(pool, n_valid, n_train)
        return _finish(suite, train, valid, {task.source: test}, manifest)
    return build


# loader name -> (builder, the sources it reads; [] = embedded data, no data root)
BUILDERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "micro": (build_micro, ()),
    "micro-task": (build_micro_task, ()),
    "paper-instruct": (build_paper_instruct, ("dolly_train", "dolly", "self_instruct", "vicuna", "sni", "unni")),
    "gsm8k": (_task_builder("gsm8k"), ("gsm8k_train", "gsm8k")),
    "dialogsum": (_task_builder("dialogsum"), ("dialogsum_train", "dialogsum")),
    "translation": (_task_builder("translation"), ("translation_train", "translation")),
}


def uses_data_root(suite) -> bool:
    return bool(BUILDERS[suite.data["loader"]][1])


def plan(suite, root: Path | None) -> dict:
    """Where each source of the suite will come from (no loading): for the version label."""
    return {k: locate(k, root) for k in BUILDERS[suite.data["loader"]][1]}


def build(suite, root: Path | None) -> SuiteData:
    builder, _ = BUILDERS[suite.data["loader"]]
    return builder(suite, root)
