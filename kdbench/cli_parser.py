"""The ``kdbench`` command line's grammar: every subcommand, option, default and argument type.

Commands (what each subcommand does) are in kdbench/cli.py; this module only parses. The
options of ``kdbench run`` and ``kdbench prepare``, and the sweep's "passed to every run"
flags, are made from the fields of ``kdbench.config.RunConfig`` (with their argument types,
which live in kdbench/run_option.py, as do the ones the other flags here share); the rest are
written here. Argument types check their values before anything is opened, and argparse's own
mistakes become one line (UserError, exit 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys

from kdbench.config import option_named, options
from kdbench.errors import UserError
from kdbench.run_option import COUNT_MAX, SEED_MAX, Option, _device, _int_in, _nonempty

RUN_ID_MAX = 2**63 - 1      # SQLite INTEGER


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own mistakes: one line, exit 2
        # "argument --steps: --steps must be ..." -> "--steps must be ..."
        m = re.match(r"argument ([^:]+): (.*)$", message, re.S)
        if m and m.group(2).startswith(m.group(1).split("/")[0]):
            message = m.group(2)
        raise UserError(" ".join(message.split()))


def _seconds(text: str) -> float:
    try:
        if "_" in text:  # float() reads Python's digit separators ("1_0" is 10): numbers are read strictly
            raise ValueError(text)
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stale-after must be a number of seconds, got {text!r}") from None
    if not (v > 0 and v < 10**9):
        raise argparse.ArgumentTypeError(f"--stale-after must be a positive number of seconds, got {text}")
    return v


CACHE_KEY_MIN = 4  # characters of a key `kdbench cache clear` takes as a prefix (keys are 24 hex digits)


def _cache_key(text: str) -> str:
    """A KEY of `kdbench cache clear`: an entry's key or a prefix of it, never empty (an unset
    ``"$KEY"`` must not name every entry) and never a pattern or a path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("KEY must not be empty (an unset shell variable?); give keys from "
                                         "`kdbench cache list`, or --all for every entry")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"KEY {text!r} is not a cache key (keys are letters, digits, - and _, "
                                         f"as `kdbench cache list` shows them; no patterns or paths)")
    if len(text) < CACHE_KEY_MIN:
        raise argparse.ArgumentTypeError(f"KEY {text!r} is too short: give at least {CACHE_KEY_MIN} characters "
                                         f"of it (see `kdbench cache list`)")
    return text


def _address(text: str) -> str:
    """--address of `kdbench leaderboard`: an IP address or a host name (RFC 1123), nothing else."""
    t = text.strip()
    if not t:
        raise argparse.ArgumentTypeError("--address must not be empty")
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        pass
    labels = t[:-1].split(".") if t.endswith(".") else t.split(".")
    if (len(t) <= 253 and all(re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", lb) for lb in labels)
            and not all(lb.isdigit() for lb in labels)):  # 999.1.1.1 is a mistyped IP address, not a name
        return t
    raise argparse.ArgumentTypeError(f"--address must be an IP address or a host name, got {text!r} "
                                     f"(127.0.0.1, the default, serves this machine only; 0.0.0.0 shares it)")


def _add_option(p, o: Option, *, help: str | None = None, default=argparse.SUPPRESS) -> None:
    """A RunConfig field's flag. Its default is SUPPRESS: the namespace holds the options given
    and nothing else (kdbench.config.given_flags; the field's own default applies otherwise)."""
    kw: dict = {"dest": o.key, "default": default, "help": o.help if help is None else help}
    if o.kind is bool:
        kw["action"] = "store_true"
    else:
        if o.kind is dict:
            kw["action"] = "append"
        if o.type is not None:
            kw["type"] = o.type(o.flag)
        if o.choices is not None:
            kw["choices"] = o.choices
        if o.metavar is not None:
            kw["metavar"] = o.metavar
    p.add_argument(o.flag, **kw)


def _run_options(p, command: str) -> None:
    """The options of `kdbench run` or `kdbench prepare`: one per RunConfig field the command takes,
    and the hidden --config-json by which `kdbench sweep` hands a job its whole configuration."""
    for o in options(command):
        _add_option(p, o)
    p.add_argument("--config-json", default=None, metavar="PATH", help=argparse.SUPPRESS)


class _Version(argparse.Action):
    """``--version``: the line is made only when asked for (it reads /proc/self/maps)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from kdbench import __version__
        from kdbench.allocator import in_use, kernel_caches, purge_delay

        caches = ", ".join(f"{k}={v or 'default'}" for k, v in kernel_caches().items())
        delay = purge_delay()
        allocator = in_use() + (f" (purge delay {delay} ms)" if delay else "")
        print(f"kdbench {__version__} (Python {sys.version.split()[0]}, allocator {allocator}, kernel caches {caches})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kdbench", description="Benchmark knowledge-distillation objectives for LLMs.")
    p.add_argument("--version", action=_Version, help="print kdbench's version, allocator and kernel-cache bounds, then exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="distil, evaluate and record one run")
    _run_options(r, "run")
    resumable = ", ".join(o.flag for o in options("run") if o.resume)
    r.add_argument("--resume", type=_int_in("--resume", 1, 2**63 - 1), default=None, metavar="RUN_ID",
                   help=f"continue an interrupted run from its last checkpoint (takes only {resumable})")

    pr = sub.add_parser("prepare", help="build what a suite's runs share (teacher fine-tune, teacher cache, reference "
                                        "rows) without training; same options as run")
    _run_options(pr, "prepare")
    pr.add_argument("--info-json", default=None, help=argparse.SUPPRESS)  # kdbench sweep reads the fingerprint

    sw = sub.add_parser("sweep", help="objectives x parameter grids x seeds x suites, skipping finished runs")
    sw.add_argument("spec", nargs="?", default=None, metavar="SPEC.yaml", help="a sweep file (see docs/sweeps.md)")
    sw.add_argument("--objectives", nargs="+", default=None, metavar="SETTING")
    sw.add_argument("--samplers", nargs="+", default=None, metavar="SAMPLER",
                    help="run every objective under each of these samplers (kdbench list); an objective that uses no "
                         "teacher runs under off only")
    sw.add_argument("--seeds", nargs="+", type=_int_in("--seeds", 0, SEED_MAX), default=None)
    sw.add_argument("--suite", nargs="+", default=None, dest="suites")
    sw.add_argument("--param", action="append", default=None, metavar="KEY=V1,V2",
                    help="a parameter grid, applied to the objectives that declare it (repeatable)")
    sw.add_argument("--tune", action="append", default=None, metavar="lr=V1,V2",
                    help="the same tuning grid for every objective; the best point per objective is chosen on "
                         "validation")
    sw.add_argument("--workers", type=_int_in("--workers", 1, 256), default=None)
    sw.add_argument("--gpus-per-run", type=_int_in("--gpus-per-run", 1, 256), default=None,
                    help="each job one run on K processes, one GPU each (default 1); workers x K GPUs in all")
    sw.add_argument("--dry-run", action="store_true", help="print one `kdbench run` command line per run")
    _add_option(sw, option_named("db"), default=None,
                help="the run store the sweep reads and its runs write (default: $KDBENCH_DB or runs.db); a URL with "
                     "a password reaches the runs in $KDBENCH_DB, never on a command line")
    for o in options("sweep"):  # the RunConfig fields a sweep passes to every run
        if o.sweep == "every":
            _add_option(sw, o, help=f"passed to every run: {o.help}")

    sub.add_parser("list", help="objectives with their parameters, and suites")

    s = sub.add_parser("show", help="a recorded run: configuration, provenance, metrics")
    s.add_argument("run_id", type=_int_in("run_id", 1, RUN_ID_MAX))
    s.add_argument("--db", type=_nonempty("--db"), default=None)

    a = sub.add_parser("analyze", help="gradient similarity between objectives on one batch of a suite")
    a.add_argument("--objectives", nargs="+", default=None, metavar="SETTING",
                   help="objective names or settings, e.g. kl rkl csd_ss 'csd(tau=1.5)' (default: a standard set)")
    a.add_argument("--suite", default="micro")
    a.add_argument("--batches", type=_int_in("--batches", 1, COUNT_MAX), default=1,
                   help="training batches to average over (default 1)")
    a.add_argument("--seed", type=_int_in("--seed", 0, SEED_MAX), default=0)
    a.add_argument("--finetune-steps", type=_int_in("--finetune-steps", 1, COUNT_MAX), default=None,
                   help="teacher fine-tuning steps for suites that fine-tune (default: the suite's; as for run)")
    a.add_argument("--device", type=_device, default="auto",
                   help="auto (default): cuda when available, else cpu; or cpu, cuda, cuda:N")
    a.add_argument("--db", type=_nonempty("--db"), default=None)

    e = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a distilled student and store the results")
    e.add_argument("run_id", type=_int_in("run_id", 1, RUN_ID_MAX))
    e.add_argument("--lm-eval", dest="lm_eval", required=True, metavar="TASKS", help="comma-separated lm-eval tasks")
    e.add_argument("--include-path", default=None, help="folder of extra lm-eval YAML tasks")
    e.add_argument("--limit", type=_int_in("--limit", 1, COUNT_MAX), default=None)
    e.add_argument("--device", type=_device, default="auto",
                   help="where lm-eval runs the student: auto (default): cuda when available, else cpu; or cpu, "
                        "cuda, cuda:N")
    e.add_argument("--db", type=_nonempty("--db"), default=None)

    c = sub.add_parser("cache", help="list or clear the teacher caches on disk (hidden states; the evaluation prompts' prefill)")
    csub = c.add_subparsers(dest="cache_command", required=True, parser_class=_Parser)
    csub.add_parser("list", help="entries with their sizes and what they were built from")
    cc = csub.add_parser("clear", help="remove the entries named by key, or every entry with --all")
    cc.add_argument("keys", nargs="*", type=_cache_key, metavar="KEY",
                    help=f"an entry's key, or a prefix of it (at least {CACHE_KEY_MIN} characters) that names "
                         f"one entry only (see `kdbench cache list`)")
    cc.add_argument("--all", action="store_true", help="remove every entry of both caches")

    lb = sub.add_parser("leaderboard", help="start the Streamlit leaderboard on the store (read-only)")
    lb.add_argument("--db", type=_nonempty("--db"), default=None)
    lb.add_argument("--port", type=_int_in("--port", 1, 65535), default=8501)
    lb.add_argument("--address", type=_address, default="127.0.0.1", metavar="ADDR",
                    help="the address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 shares the "
                         "store, read-only and without authentication, with every host that can reach this one)")

    g = sub.add_parser("gc", help="runs whose process is gone: list them; mark them interrupted or delete them")
    g.add_argument("--db", type=_nonempty("--db"), default=None)
    act = g.add_mutually_exclusive_group()
    act.add_argument("--mark", action="store_true", help="record them as interrupted")
    act.add_argument("--delete", action="store_true",
                     help="delete them with all their rows (metrics, curves, samples, artifacts)")
    g.add_argument("--yes", action="store_true", help="do not ask before --delete")
    g.add_argument("--stale-after", type=_seconds, default=None, metavar="SECONDS",
                   help="a heartbeat older than this means the process is gone (default: 10 x the 30 s interval)")
    return p
