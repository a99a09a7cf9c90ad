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
       if k not in (allocator.ENV, "LD_PRELOAD", "_KDBENCH_ALLOCATOR_REEXEC", *allocator.KERNEL_CACHES)}


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
