"""The ``kdbench`` commands: what each subcommand does (the grammar: kdbench/cli_parser.py).
User mistakes print one line and exit 2; failed runs exit 1."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from kdbench.cli_parser import build_parser, parse_params
from kdbench.errors import KdbenchWarning, RunFailed, UserError

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1


def cmd_run(args) -> int:
    from kdbench.runner import RunRequest, default_threads, run

    default_threads()
    if args.resume is not None:
        from kdbench.runner import resume

        given = [f for f in ("objective", "param", "steps", "eval_limit", "finetune_steps", "pair", "teacher", "student",
                             "data_dir", "keep_activations")
                 if getattr(args, f) not in (None, [], False)]
        if given or args.suite != "micro" or args.seed != 0:
            raise UserError("--resume continues a run with its own configuration; it takes only --db and --no-progress")
        run_id = resume(args.resume, args.db, argv=sys.argv, progress=not args.no_progress)
        return _print_run_table(args.db, run_id)
    if args.objective is None:
        raise UserError("the following arguments are required: --objective")
    req = RunRequest(objective=args.objective, params=parse_params(args.param), suite=args.suite, seed=args.seed,
                     steps=args.steps, eval_limit=args.eval_limit, finetune_steps=args.finetune_steps, db=args.db,
                     device=args.device, save_student=not args.no_save, progress=not args.no_progress, pair=args.pair,
                     teacher=args.teacher, student=args.student, teacher_finetuned=args.teacher_finetuned,
                     data_dir=args.data_dir, teacher_source=args.teacher_source, sweep_id=args.sweep_id, lr=args.lr,
                     keep_activations=args.keep_activations)
    run_id = run(req, argv=sys.argv)
    return _print_run_table(args.db, run_id)


def _print_run_table(db, run_id: int) -> int:
    from kdbench.report import comparison_table
    from kdbench.store import display_name, get_run, open_engine

    engine = open_engine(db)
    refs = get_run(engine, run_id).config.get("reference_runs", {})
    columns = [(role, rid) for role, rid in refs.items()] + [("distilled", run_id)]
    print()
    print(comparison_table(engine, columns))
    print(f"\n[kdbench] run {run_id} stored in {display_name(engine)}  (kdbench show {run_id}; kdbench leaderboard)")
    return 0


def cmd_prepare(args) -> int:
    from kdbench.runner import RunRequest, default_threads, prepare_only

    default_threads()
    req = RunRequest(objective=args.objective or "kl", params=parse_params(args.param), suite=args.suite,
                     seed=args.seed, steps=args.steps, eval_limit=args.eval_limit, finetune_steps=args.finetune_steps,
                     db=args.db, device=args.device, progress=not args.no_progress, pair=args.pair, teacher=args.teacher, student=args.student,
                     teacher_finetuned=args.teacher_finetuned, data_dir=args.data_dir,
                     teacher_source=args.teacher_source, lr=args.lr)
    info = prepare_only(req, argv=sys.argv)
    print(f"[kdbench] prepared {info['suite']} v{info['version']}: reference runs {info['reference_runs']}, "
          f"teacher source {info['teacher_source']}, reference fingerprint {info['reference_fingerprint']}")
    if args.info_json:  # for `kdbench sweep`: which teacher this machine prepared
        Path(args.info_json).write_text(json.dumps(info, default=str))
    return 0


def cmd_sweep(args) -> int:
    from kdbench.sweep import RUN_FLAGS, RUN_OPTIONS, SweepSpec, run_sweep

    run_opts = {k: getattr(args, k) for k in set(RUN_OPTIONS) | set(RUN_FLAGS)
                if k != "lr" and getattr(args, k, None) not in (None, False)}

    def grids(items, flag):
        out = {}
        for item in items or []:
            key, sep, values = item.partition("=")
            if not sep or not key.strip() or not values.strip():
                raise UserError(f"malformed {flag} {item!r}; expected key=v1,v2")
            out[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        return out

    flags = {"objectives": args.objectives, "seeds": args.seeds, "suites": args.suites,
             "params": grids(args.param, "--param"), "tune": grids(args.tune, "--tune"), "workers": args.workers,
             "db": args.db}
    if args.spec:
        spec = SweepSpec.from_yaml(args.spec, **flags)
        spec.run = {**(spec.run or {}), **run_opts}
    else:
        if not args.objectives:
            raise UserError("kdbench sweep needs --objectives (or a SPEC.yaml file)")
        spec = SweepSpec(**{k: v for k, v in flags.items() if v not in (None, [], {})}, run=run_opts)
    return run_sweep(spec, dry_run=args.dry_run)


def cmd_list(_args) -> int:
    from kdbench.catalogue import format_catalogue
    from kdbench.registry import list_objectives
    from kdbench.suites import format_suites

    print(format_catalogue(list_objectives()))
    print("\nSuites (version, tasks [kind: headline, decoding], teacher -> student pairs):")
    print(format_suites())
    return 0


def cmd_show(args) -> int:
    from kdbench.lifecycle import liveness
    from kdbench.report import describe_run
    from kdbench.store import display_name, get_run, open_engine, require_schema

    engine = open_engine(args.db, readonly=True)
    require_schema(engine)
    run = get_run(engine, args.run_id)
    if run is None:
        raise UserError(f"no run {args.run_id} in the store {display_name(engine)}")
    text = describe_run(engine, args.run_id)
    status, why = liveness(run)
    if status != run.status:  # a "running" row whose process is gone: show what it really is
        text = re.sub(r"^status: .*$", f"status: {status} (recorded {run.status}; {why})", text, count=1, flags=re.M)
    print(text)
    return 0


def cmd_gc(args) -> int:
    from kdbench.lifecycle import DEFAULT_STALE_AFTER_S, delete_orphans, find_orphans, mark_interrupted
    from kdbench.store import display_name, open_engine, require_schema

    kw = {"stale_after_s": args.stale_after or DEFAULT_STALE_AFTER_S}
    ro = open_engine(args.db, readonly=True)  # never creates a store, and refuses a foreign or newer one
    require_schema(ro)
    where = display_name(ro)
    orphans = find_orphans(ro, **kw)
    ro.dispose()
    stale = [o for o in orphans if o.stale]
    if not orphans:
        print(f"[kdbench] no interrupted runs in {where}")
        return 0
    print(f"{'run':>5}  {'recorded':11}  {'role':12}  {'setting':28}  {'suite':22}  {'host:pid':22}  why")
    for o in orphans:
        who = f"{o.host}:{o.pid}" if o.host or o.pid else "-"
        suite = f"{o.suite} v{o.suite_version}"
        print(f"{o.run_id:>5}  {o.recorded:11}  {o.role:12}  {(o.setting or '-')[:28]:28}  {suite[:22]:22}  "
              f"{who[:22]:22}  {o.reason}")
    n_rec = len(orphans) - len(stale)
    print(f"[kdbench] {len(stale)} running run(s) whose process is gone, {n_rec} recorded interrupted, in {where}")
    if args.mark:
        engine = open_engine(args.db)
        done = mark_interrupted(engine, [o.run_id for o in stale], **kw)
        print(f"[kdbench] marked {len(done)} run(s) interrupted: {', '.join(map(str, done)) or '-'}")
    elif args.delete:
        if not args.yes:
            if not sys.stdin.isatty():
                raise UserError(f"--delete removes {len(orphans)} run(s) and all their rows; add --yes to confirm")
            answer = input(f"delete {len(orphans)} run(s) and all their rows? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("[kdbench] nothing deleted")
                return 0
        engine = open_engine(args.db)
        done = delete_orphans(engine, orphans, **kw)
        print(f"[kdbench] deleted {len(done)} run(s) with their rows: {', '.join(map(str, done)) or '-'}")
    elif orphans:
        print("[kdbench] kdbench gc --mark records them as interrupted; kdbench gc --delete --yes deletes them")
    return 0


def cmd_leaderboard(args) -> int:
    import shutil
    from pathlib import Path

    import leaderboard_app
    from sqlalchemy.engine import make_url

    from kdbench.store import DB_ENV_VAR, resolve_url

    app = Path(leaderboard_app.__file__).with_name("app.py")
    streamlit = shutil.which("streamlit") or os.path.join(os.path.dirname(sys.executable), "streamlit")
    url, env = resolve_url(args.db), dict(os.environ)
    cmd = [streamlit, "run", str(app), "--server.port", str(args.port)]
    parsed = make_url(url)
    if parsed.password:  # in the environment, never on a command line (`ps` shows those)
        env[DB_ENV_VAR] = url
        print(f"[kdbench] {' '.join(cmd)}  ({DB_ENV_VAR}={parsed.render_as_string(hide_password=True)})")
    else:
        cmd += ["--", "--db", url]
        print("[kdbench] " + " ".join(cmd))
    os.execve(streamlit, cmd, env)
    return 0  # not reached


def _cache_listing(title: str, root, entries, describe) -> None:
    print(f"{title} in {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        teacher = str(e.meta.get("inputs", {}).get("teacher", {}).get("weights", "?"))[:12]
        print(f"  {e.key}  {e.size_bytes / 2**20:8.1f} MB  {describe(e)}, teacher {teacher}, "
              f"built {e.meta.get('created_at', '?')}, last used {e.last_used}")


def cmd_cache(args) -> int:
    from kdbench.engine import prompt_cache, teacher_cache

    if args.cache_command == "list":
        entries, prompts = teacher_cache.list_entries(), prompt_cache.list_entries()
        _cache_listing("teacher cache", teacher_cache.cache_root(), entries,
                       lambda e: f"{e.meta['n_rows']} positions of {e.meta['n_examples']} examples, {e.meta['dtype']}"
                                 + ("" if e.meta.get("format") == teacher_cache.CACHE_FORMAT else
                                    f", format {e.meta.get('format')}: no longer read, remove it with `kdbench cache clear`"))
        _cache_listing("teacher prompt cache", prompt_cache.cache_root(), prompts,
                       lambda e: f"{e.meta['batches']} batches of prompts, {e.meta['inputs'].get('dtype')}, "
                                 f"{e.meta['inputs'].get('threads')} thread(s)")
        total = sum(e.size_bytes for e in [*entries, *prompts])
        print(f"  total {total / 2**20:.1f} MB")
        return 0
    if args.keys:
        known = [e.key for e in teacher_cache.list_entries()] + [e.key for e in prompt_cache.list_entries()]
        unknown = [k for k in args.keys if not any(key.startswith(k) for key in known)]
        if unknown:
            raise UserError(f"no teacher-cache entry matches {', '.join(unknown)} (see `kdbench cache list`)")
    removed = teacher_cache.clear(args.keys or None) + prompt_cache.clear(args.keys or None)
    for key, size in removed:
        print(f"removed {key} ({size / 2**20:.1f} MB)")
    print(f"[kdbench] freed {sum(s for _, s in removed) / 2**20:.1f} MB")
    return 0


def cmd_analyze(args) -> int:
    from kdbench.analyze import run_analysis

    return run_analysis(args)


def cmd_eval(args) -> int:
    from pathlib import Path

    from kdbench.store import display_name, get_run, open_engine, require_schema

    # Everything checkable is checked on a read-only engine first: a missing store is never
    # created, a foreign / newer / damaged one never touched, and a bad run id costs nothing.
    ro = open_engine(args.db, readonly=True)
    try:
        require_schema(ro)
        run = get_run(ro, args.run_id)
        if run is None:
            raise UserError(f"no run {args.run_id} in the store {display_name(ro)}")
        if run.status != "finished" or not run.checkpoint_path or not (Path(run.checkpoint_path) / "config.json").exists():
            raise UserError(f"run {args.run_id} has no saved student (status {run.status}; runs with --no-save keep none)")
    finally:
        ro.dispose()
    if not [t for t in args.lm_eval.split(",") if t.strip()]:
        raise UserError("--lm-eval needs at least one task name")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: no such folder")
    from kdbench.lmeval import eval_run

    return eval_run(args)


COMMANDS = {"run": cmd_run, "list": cmd_list, "show": cmd_show, "analyze": cmd_analyze, "eval": cmd_eval,
            "cache": cmd_cache, "leaderboard": cmd_leaderboard, "gc": cmd_gc, "prepare": cmd_prepare,
            "sweep": cmd_sweep}


def _terminate(_signum, _frame):
    # `kill` (SIGTERM): a run that is training checkpoints at the end of its step and stops
    # (resumable, recorded as interrupted); anything else unwinds like Ctrl-C.
    from kdbench.lifecycle import GRACEFUL

    if not GRACEFUL.request():
        raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, KdbenchWarning):
        print(f"kdbench: warning: {_one_line(message)}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    from sqlalchemy.exc import SQLAlchemyError

    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"kdbench: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except SQLAlchemyError as exc:  # a store that broke after it was opened (corrupt pages, lost server)
        orig = getattr(exc, "orig", None) or exc
        print(f"kdbench: error: run store: {_one_line(orig)}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"kdbench: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("kdbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`kdbench list | head`): quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered is flushed at exit, not into the pipe
        return 128 + signal.SIGPIPE  # as a shell reports a reader's early exit
    finally:
        warnings.showwarning = previous


def entry() -> int:
    """The ``kdbench`` console script: bounded kernel caches, and mimalloc preloaded where installed
    (kdbench/allocator.py)."""
    from kdbench.allocator import bound_kernel_caches, reexec_with_mimalloc

    bound_kernel_caches()
    reexec_with_mimalloc()
    return main()


if __name__ == "__main__":
    sys.exit(main())
