"""What every on-disk cache of kdbench shares: where the cache is, and how an entry is named,
built, published, stamped, listed and removed.

Everything kdbench keeps between runs lives under :func:`cache_home` (``$KDBENCH_CACHE``, else
``~/.cache/kdbench``): converted and fine-tuned teachers (kdbench/models.py,
kdbench/finetune.py), the teacher cache (kdbench/engine/teacher_cache.py), the teacher's
prefill of the evaluation prompts (kdbench/evaluation/prompt_cache.py), run checkpoints and
saved students. An entry of a cache is a folder that is

* **named by its content**: :func:`digest` of everything it depends on, so any change is a new
  entry and a stale one is never read;
* **built once**: under :func:`lock`, an exclusive ``flock`` on ``<root>/<key>.lock``, so
  processes asking for one entry at once build it once (the others wait and read it);
* **published by a rename** (:func:`publishing_dir`): written into a temporary sibling that
  replaces the final folder when complete, so no reader ever sees half an entry;
* **stamped when read** (:func:`mark_used`), so a listing tells an entry that runs still read
  from one whose key no run computes any more (a changed teacher, kdbench or torch);
* **listed and removed** by its ``meta.json`` (:func:`published`, :func:`remove`): a published
  entry names itself (its key is the folder's name); listing writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdbench.errors import UserError

CACHE_ENV_VAR = "KDBENCH_CACHE"

#: Hex digits of a cache key (96 bits of sha256): :func:`digest`'s default length. The caches'
#: keys have always been this long; shorter digests (a tokens check) and full ones (what a key
#: is computed from) pass their length.
DIGEST_LEN = 24


def digest(obj, n: int = DIGEST_LEN) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj``'s canonical JSON (keys sorted): how a
    cache names an entry by its inputs, and how those inputs name what they digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def cache_home() -> Path:
    """Where converted models, teacher caches and checkpoints live (``$KDBENCH_CACHE`` or
    ~/.cache/kdbench), looked up without creating or touching anything: what a reader such as
    ``kdbench cache list`` uses. A location that cannot be a cache folder (empty, a file, a broken
    link, under a file, where no folder can be created) is a :class:`UserError`, one line."""
    raw = os.environ.get(CACHE_ENV_VAR)
    if raw is None:
        root = Path.home() / ".cache" / "kdbench"
        what = f"the cache folder {root}"
    elif not raw.strip():
        raise UserError(f"${CACHE_ENV_VAR} is empty; unset it (the cache is then ~/.cache/kdbench) or name a folder")
    else:
        root = Path(raw).expanduser()
        what = f"${CACHE_ENV_VAR}={raw}"
    if root.is_symlink() and not root.exists():
        raise UserError(f"{what} is a broken symbolic link (to {os.readlink(root)})")
    if root.exists():
        if not root.is_dir():
            raise UserError(f"{what} is not a folder")
        return root
    above = root.parent
    while not above.exists() and not above.is_symlink() and above != above.parent:  # the nearest that exists
        above = above.parent
    if above.is_symlink() and not above.exists():
        raise UserError(f"cannot create {what}: {above} is a broken symbolic link")
    if not above.is_dir():
        raise UserError(f"{what} is not a folder: {above} is a file")
    try:
        fs = os.statvfs(above)
        pseudo = fs.f_blocks == 0 or fs.f_flag & os.ST_RDONLY  # /proc, /sys, a read-only mount
    except OSError:
        pseudo = True
    if pseudo or not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {what}: {above} is not writable")
    return root


def cache_dir() -> Path:
    """:func:`cache_home`, created if missing: for everything that writes into the cache."""
    root = cache_home()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the cache folder {root} (${CACHE_ENV_VAR}): {exc.strerror or exc}") from None
    return root


@contextlib.contextmanager
def lock(root: Path, key: str):
    """An exclusive ``flock`` on ``root/<key>.lock`` (held while an entry is built or removed)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def publishing_dir(final: Path):
    """Yield a temporary (hidden) sibling folder of ``final`` to write into; on success it
    replaces ``final`` (an older or inconsistent leftover included) by a rename, so a killed
    build never leaves a half-written entry, model or fine-tune that a later run trusts. On
    failure the temporary folder goes and ``final`` stays as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


USED = "last_used"  # an empty file in an entry, touched whenever a run reads the entry


def mark_used(path: Path) -> None:
    """Stamp an entry as read now (best effort: a read-only cache is still usable)."""
    try:
        (path / USED).touch()
    except OSError:
        pass


@dataclass
class Published:
    """A published entry: its folder and its ``meta.json`` (the file written last)."""

    path: Path
    meta: dict

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    @property
    def last_used(self) -> str:
        """When a run last read this entry (UTC), else when it was built: what tells a live
        entry from one whose key no run computes any more (``kdbench cache list``)."""
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((self.path / USED).stat().st_mtime))
        except OSError:
            return self.meta.get("created_at", "?")


def published_meta(p: Path) -> dict | None:
    """``meta.json`` of the entry folder ``p`` if it is one (a published entry names itself: its
    key is the folder's name), else None. Reads only."""
    if p.name.startswith(".") or p.is_symlink() or not p.is_dir():
        return None
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("key") == p.name else None


def published(root: Path) -> list[Published]:
    """The published entries under ``root``, by key. Reads only: creates nothing, stamps nothing."""
    if not root.is_dir():
        return []
    return [Published(p, meta) for p in sorted(root.iterdir()) if (meta := published_meta(p)) is not None]


def remove(root: Path, entries: Sequence[Published], keys: Sequence[str] = (), *,
           everything: bool = False) -> list[tuple[str, int]]:
    """Remove the entries whose key is one of ``keys`` (whole keys, never prefixes: an empty
    string names nothing), or every entry with ``everything=True``; each under its lock, by a
    rename out of sight first (an entry is there whole or gone). Returns (key, bytes freed)."""
    wanted = {k for k in keys if k}
    removed = []
    for entry in entries:
        if not (everything or entry.key in wanted):
            continue
        with lock(root, entry.key):
            gone = entry.path.with_name(f".{entry.path.name}.removing-{os.getpid()}-{time.time_ns()}")
            try:
                size = entry.size_bytes
                os.rename(entry.path, gone)
            except FileNotFoundError:  # removed meanwhile by another process
                size = None
            except OSError as exc:
                raise UserError(f"cannot remove cache entry {entry.key} from {root}: {exc.strerror or exc}"
                                + (f" (removed before it: {', '.join(k for k, _ in removed)})" if removed else "")
                                ) from None
            else:
                shutil.rmtree(gone, ignore_errors=True)
        (root / f"{entry.key}.lock").unlink(missing_ok=True)
        if size is not None:
            removed.append((entry.key, size))
    return removed


def clear(root: Path, keys: Sequence[str] = (), *, everything: bool = False) -> list[tuple[str, int]]:
    """Remove the published entries under ``root`` with these whole keys, or every one; returns
    (key, bytes freed)."""
    return remove(root, published(root), keys, everything=everything)
