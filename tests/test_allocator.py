"""The kdbench command runs with mimalloc preloaded where it is installed (kdbench/allocator.py),
the system allocator on request, and never loops or breaks the command when it cannot."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import allocator

LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"
ENV = {k: v for k, v in os.environ.items()
       if k not in (allocator.ENV, "LD_PRELOAD", "_KDBENCH_ALLOCATOR_REEXEC", "MIMALLOC_PURGE_DELAY",
                     *allocator.KERNEL_CACHES)}


def version(*cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "--version"], env={**ENV, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not LINUX_X86, reason="cmeel-mimalloc is a dependency on Linux x86_64 only")
def test_the_command_preloads_mimalloc_and_the_library_does_not():
    assert allocator.mimalloc_path() is not None  # installed with kdbench (pyproject.toml)
    assert allocator.in_use() == "system"  # this pytest process imported kdbench: nothing re-executed
    out = version(sys.executable, "-m", "kdbench")
    assert out.returncode == 0 and "allocator mimalloc" in out.stdout, out.stdout + out.stderr
    script = Path(sys.executable).with_name("kdbench")  # the console script (cli.entry)
    if script.exists():
        out = version(str(script))
        assert out.returncode == 0 and "allocator mimalloc" in out.stdout, out.stdout + out.stderr


def test_system_on_request_and_a_bad_value_is_a_warning():
    out = version(sys.executable, "-m", "kdbench", KDBENCH_ALLOCATOR="system")
    assert out.returncode == 0 and "allocator system" in out.stdout
    out = version(sys.executable, "-m", "kdbench", KDBENCH_ALLOCATOR="jemalloc")
    assert out.returncode == 0 and "allocator system" in out.stdout
    assert "KDBENCH_ALLOCATOR='jemalloc' is not one of mimalloc, system" in out.stderr


def test_no_library_or_already_preloaded_runs_on_without_exec(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.delenv("_KDBENCH_ALLOCATOR_REEXEC", raising=False)
    monkeypatch.setattr(allocator, "mimalloc_path", lambda: None)
    allocator.reexec_with_mimalloc()
    monkeypatch.setattr(allocator, "mimalloc_path", lambda: "/opt/lib/libmimalloc.so.3")
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libmimalloc.so.3")
    allocator.reexec_with_mimalloc()
    assert calls == []
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libother.so")
    allocator.reexec_with_mimalloc()  # the exec (recorded, not done): the library first, the user's after
    ((exe, argv, env),) = calls
    assert exe == sys.executable and env["LD_PRELOAD"] == "/opt/lib/libmimalloc.so.3:/usr/lib/libother.so"
    assert env["_KDBENCH_ALLOCATOR_REEXEC"] == "1"  # the re-executed process never execs again


def test_the_command_bounds_kernel_caches_and_keeps_a_users_value():
    out = version(sys.executable, "-m", "kdbench")
    assert out.returncode == 0
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=64, LRU_CACHE_CAPACITY=1" in out.stdout, out.stdout
    out = version(sys.executable, "-m", "kdbench", ONEDNN_PRIMITIVE_CACHE_CAPACITY="512")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=512, LRU_CACHE_CAPACITY=1" in out.stdout, out.stdout
    script = Path(sys.executable).with_name("kdbench")  # the console script (cli.entry)
    if script.exists():
        out = version(str(script))
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=64, LRU_CACHE_CAPACITY=1" in out.stdout, out.stdout


PURGE_PROBE = """
import torch
from kdbench import allocator

def rss_mb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) // 1024

base = rss_mb()
x = torch.ones(64 * 2**20)  # 256 MB, every page touched
held = rss_mb()
del x
freed = rss_mb()
print(allocator.in_use(), allocator.purge(), base, held, freed, rss_mb())
"""


@pytest.mark.skipif(not LINUX_X86, reason="cmeel-mimalloc is a dependency on Linux x86_64 only")
def test_freed_memory_stays_for_reuse_until_a_phase_ends_its_purge():
    """With kdbench's purge delay a freed 256 MB tensor stays resident (the next step reuses its
    pages instead of faulting them in again); allocator.purge() -- called by release_memory where
    a phase ends -- hands it back to the OS."""
    env = {**ENV, "LD_PRELOAD": allocator.mimalloc_path(), "MIMALLOC_PURGE_DELAY": allocator.PURGE_DELAY_MS,
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PURGE_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, purged, base, held, freed, after = out.stdout.split()
    base, held, freed, after = map(int, (base, held, freed, after))
    assert (name, purged) == ("mimalloc", "True")
    assert held - base >= 250
    assert freed - base >= 250, "freed memory was purged at once: the delay is not in effect"
    assert freed - after >= 250, "purge() did not hand the freed memory back"
    assert allocator.purge() is False  # this process runs on the system allocator: nothing to do


def test_the_command_sets_a_purge_delay_and_keeps_a_users_value():
    out = version(sys.executable, "-m", "kdbench")
    if "allocator mimalloc" not in out.stdout:
        pytest.skip("mimalloc is not installed here (Linux x86_64 only)")
    assert f"purge delay {allocator.PURGE_DELAY_MS} ms" in out.stdout, out.stdout
    out = version(sys.executable, "-m", "kdbench", MIMALLOC_PURGE_DELAY="250")
    assert "purge delay 250 ms" in out.stdout, out.stdout
