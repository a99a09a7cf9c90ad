"""Document builders for kdbench's lm-eval tasks (referenced from the YAML by ``!function``).

lm-eval imports this file by path and calls the builder with the task's metadata and
``dataset_kwargs`` as keyword arguments; it returns ``{split: datasets.Dataset}``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

try:  # loaded by file path: make sure the kdbench package next to this folder is importable
    import kdbench  # noqa: F401
except ImportError:  # pragma: no cover - only when kdbench is neither installed nor on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MULTI30K_MC_SEED = "kdbench-multi30k-mc-v1"
N_CHOICES = 4


def multi30k_mc_docs(data_dir: str | Path | None = None, split: str = "test_2016_flickr") -> list[dict]:
    """One document per Multi30k pair: ``src`` (English), ``choices`` (4 German), ``label``.

    Distractors: three other target sentences of the same split, drawn with
    ``random.Random(f"{MULTI30K_MC_SEED}:{i}")`` (string seeds are hashed with SHA-512, so the
    draw does not depend on PYTHONHASHSEED), never equal to the reference text. The reference is
    placed at position ``i % 4`` so labels are balanced.
    """
    from kdbench.data.loaders import load_multi30k, shared_data_dir

    root = Path(data_dir) if data_dir else shared_data_dir()
    exs = load_multi30k(root / "translation" / "multi30k", split, src="en", tgt="de")
    tgts = [e.references[0] for e in exs]
    docs = []
    for i, e in enumerate(exs):
        rng = random.Random(f"{MULTI30K_MC_SEED}:{i}")
        distract: list[str] = []
        while len(distract) < N_CHOICES - 1:
            j = rng.randrange(len(tgts))
            if j != i and tgts[j] != tgts[i] and tgts[j] not in distract:
                distract.append(tgts[j])
        label = i % N_CHOICES
        choices = distract[:label] + [tgts[i]] + distract[label:]
        docs.append({"id": e.id, "src": e.meta["src"], "choices": choices, "label": label})
    return docs


def multi30k_mc(**kwargs):
    """lm-eval ``custom_dataset`` entry point: ``{"test": Dataset}`` (``data_dir`` from metadata)."""
    import datasets

    docs = multi30k_mc_docs(kwargs.get("data_dir"))
    return {"test": datasets.Dataset.from_list(docs)}
