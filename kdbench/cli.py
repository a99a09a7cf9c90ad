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

from kdbench.cli_parser import build_parser
from kdbench.errors import KdbenchWarning, RunFailed, UserError

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1


def _run_config(args, command: str):
    """The RunConfig of `kdbench run` / `kdbench prepare`: from the flags given, or whole from the
    JSON file `kdbench sweep` hands a job (--config-json), which then takes no other option."""
    from kdbench.config import from_dict, from_flags, given_flags

    given = given_flags(args, command)
    if not args.config_json:
        return from_flags(given, command)
    if given:
        raise UserError(f"--config-json carries the whole configuration; it takes no other option (got "
                        f"{', '.join('--' + k.replace('_', '-') for k in given)})")
    try:
        values = json.loads(Path(args.config_json).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--config-json {args.config_json}: cannot read a configuration ({exc})") from None
    return from_dict(values, f"--config-json {args.config_json}")


def _before_torch(config) -> None:
    """What a run's configuration asks of the process before torch is imported (so before CUDA
    and cuBLAS start): ``--deterministic`` configures cuBLAS's workspace (kdbench/allocator.py)."""
    if config.deterministic:
        from kdbench.allocator import deterministic_cublas

        deterministic_cublas()


def _without_num_processes(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-processes N`` (or ``--num-processes=N``): what each rank runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def cmd_run(args) -> int:
    from kdbench import distributed

    world = distributed.from_env()
    if args.resume is not None:
        from kdbench.config import given_flags, options

        allowed = [o for o in options("run") if o.resume]
        extra = set(given_flags(args, "run")) - {o.key for o in allowed} - {"num_processes"}
        if extra or args.config_json:
            raise UserError(f"--resume continues a run with its own configuration; it takes only "
                            f"{' and '.join(o.flag for o in allowed)} (and --num-processes)")
        config = _run_config(args, "run")
        from kdbench.resumption import ResumeView, claim_resume, inspect_resume

        n = getattr(args, "num_processes", None) or 1
        if n > 1 and not world.several:  # checked here once, then resumed by n ranks
            run, _, _ = inspect_resume(args.resume, config.db)
            return distributed.launch(n, _without_num_processes(args.argv),
                                      device_type=str((run.config or {}).get("device", "cpu")).split(":")[0])
        if not world.main:  # rank 0 claims the run; the others read it
            view = ResumeView(*inspect_resume(args.resume, config.db, progress=False))
            _before_torch(view.run_config)
            from kdbench.device import default_threads
            from kdbench.recipe import resume

            default_threads()
            resume(view, argv=sys.argv)
            return 0
        claim = claim_resume(args.resume, config.db, progress=config.progress)  # before torch is imported
        try:
            _before_torch(claim.run_config)
            from kdbench.device import default_threads
            from kdbench.recipe import resume

            default_threads()
        except BaseException:
            claim.release()
            raise
        run_id = resume(claim, argv=sys.argv)
        return _print_run_table(config.db, run_id)
    config = _run_config(args, "run")
    if world.several and config.num_processes not in (1, world.size):
        raise UserError(f"--num-processes {config.num_processes} inside a launcher that started {world.size} "
                        f"processes; give one or the other")
    if config.num_processes > 1 and not world.several:
        from kdbench.config import resolve
        from kdbench.device import resolve_device

        resolve(config)  # a mistake is one line here, not one per process
        return distributed.launch(config.num_processes, _without_num_processes(args.argv),
                                  device_type=resolve_device(config.device).type)
    _before_torch(config)
    from kdbench.device import default_threads
    from kdbench.recipe import run

    default_threads()  # several processes: each its OMP_NUM_THREADS share (the launchers set it)
    run_id = run(config, argv=sys.argv)
    if run_id is None:  # a rank other than 0: rank 0 records and reports
        return 0
    return _print_run_table(config.db, run_id)


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
    import dataclasses

    config = _run_config(args, "prepare")
    if config.objective is None:  # what a suite's runs share does not depend on the objective
        config = dataclasses.replace(config, objective="kl")
    _before_torch(config)
    from kdbench.device import default_threads
    from kdbench.recipe import prepare_only

    default_threads()
    info = prepare_only(config, argv=sys.argv)
    print(f"[kdbench] prepared {info['suite']} v{info['version']}: reference runs {info['reference_runs']}, "
          f"teacher source {info['teacher_source']}, reference fingerprint {info['reference_fingerprint']}")
    if args.info_json:  # for `kdbench sweep`: which teacher this machine prepared
        Path(args.info_json).write_text(json.dumps(info, default=str))
    return 0


def cmd_sweep(args) -> int:
    from kdbench.config import options
    from kdbench.sweep import run_sweep
    from kdbench.sweep_spec import SweepSpec

    # the RunConfig options given to pass to every run (their flags: kdbench/cli_parser.py)
    run_opts = {o.key: getattr(args, o.key) for o in options("sweep") if o.sweep == "every" and hasattr(args, o.key)}

    def grids(items, flag):
        """``KEY=V1,V2`` (repeatable) → {KEY: [V1, V2]}: every value given, every key once (an
        empty grid, ``tau=1,,2`` or a second ``tau=`` would silently change the sweep)."""
        out = {}
        for item in items or []:
            key, sep, values = item.partition("=")
            key, parts = key.strip(), [v.strip() for v in values.split(",")]
            if not sep or not key or not all(parts):
                raise UserError(f"malformed {flag} {item!r}; expected key=v1,v2 (every value given)")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise UserError(f"malformed {flag} {item!r}: {key!r} is not a parameter name")
            if key in out:
                raise UserError(f"{flag} {key!r} given twice; give its values once: {key}=v1,v2")
            out[key] = parts
        return out

    flags = {"objectives": args.objectives, "samplers": args.samplers, "seeds": args.seeds, "suites": args.suites,
             "params": grids(args.param, "--param"), "tune": grids(args.tune, "--tune"), "workers": args.workers, "gpus_per_run": args.gpus_per_run,
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
    from kdbench.engine.samplers import format_samplers
    from kdbench.registry import list_objectives
    from kdbench.suites import format_suites

    print(format_catalogue(list_objectives()))
    print("\nSamplers (--sampler: where training responses come from; any objective that uses a teacher):")
    print(format_samplers())
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
    import ipaddress
    import shutil
    import socket
    from pathlib import Path

    import leaderboard_app

    from kdbench.secrets import parse_url, redact_url, secret_parts
    from kdbench.store import DB_ENV_VAR, open_engine, require_schema, resolve_url

    # what the app could not show is refused before a server starts: a missing, foreign, damaged or newer store
    engine = open_engine(args.db, readonly=True)  # never creates a store
    try:
        require_schema(engine)
    finally:
        engine.dispose()
    # the address and port must be this machine's and free (else streamlit fails after it started)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(args.address, args.port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind(sockaddr)
    except OSError as exc:  # socket.gaierror included
        raise UserError(f"cannot serve on {args.address}:{args.port}: {exc.strerror or exc}") from None
    try:
        local = ipaddress.ip_address(args.address).is_loopback
    except ValueError:
        local = args.address == "localhost"

    app = Path(leaderboard_app.__file__).with_name("app.py")
    streamlit = shutil.which("streamlit") or os.path.join(os.path.dirname(sys.executable), "streamlit")
    if not os.access(streamlit, os.X_OK):
        raise UserError("streamlit is not installed in this environment (it comes with kdbench's dependencies)")
    url, env = resolve_url(args.db), dict(os.environ)
    # flags outrank every config.toml and STREAMLIT_* variable; CORS and XSRF protection stay at streamlit's
    # defaults (on; leaderboard_app/.streamlit/config.toml pins them too); headless: no browser, no e-mail prompt
    cmd = [streamlit, "run", str(app), "--server.address", args.address, "--server.port", str(args.port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if not local:
        print(f"[kdbench] sharing the store on {args.address}:{args.port}: anyone who can reach this machine reads "
              f"every run's configuration, provenance and samples, without authentication (README: Sharing the "
              f"leaderboard)")
    parsed = parse_url(url)
    if secret_parts(parsed):  # in the environment, never on a command line (`ps` shows those)
        env[DB_ENV_VAR] = url
        print(f"[kdbench] {' '.join(cmd)}  ({DB_ENV_VAR}={redact_url(parsed)})")
    else:
        cmd += ["--", "--db", url]
        print("[kdbench] " + " ".join(cmd))
    os.execve(streamlit, cmd, env)
    return 0  # not reached


def _meta(e, *path, default="?"):
    """``e.meta[path[0]][path[1]]...``, or ``default`` where an entry's meta.json lacks it (an old or damaged entry)."""
    value = e.meta
    for p in path:
        value = value.get(p) if isinstance(value, dict) else None
    return default if value is None else value


def _cache_listing(title: str, root, entries, describe) -> None:
    print(f"{title} in {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        teacher = str(_meta(e, "inputs", "teacher", "weights"))[:12]
        print(f"  {e.key}  {e.size_bytes / 2**20:8.1f} MB  {describe(e)}, teacher {teacher}, "
              f"built {_meta(e, 'created_at')}, last used {e.last_used}")


def cmd_cache(args) -> int:
    """`kdbench cache list` reads only (creates no folder, stamps no entry); `kdbench cache clear`
    removes the entries named by KEY (each KEY names exactly one: a whole key or a prefix of at
    least 4 characters that no other key shares), or every entry with --all, never by default."""
    from kdbench.diskcache import cache_home
    from kdbench.engine import seqkd, teacher_cache
    from kdbench.evaluation import prompt_cache

    if args.cache_command == "clear" and args.keys and args.all:
        raise UserError("cache clear takes KEYs or --all, not both")
    if args.cache_command == "clear" and not args.keys and not args.all:
        raise UserError("cache clear needs the KEY of each entry to remove (see `kdbench cache list`), "
                        "or --all for every entry")
    try:
        entries, prompts, sets = teacher_cache.list_entries(), prompt_cache.list_entries(), seqkd.list_entries()
    except OSError as exc:
        raise UserError(f"cannot read the teacher caches in {cache_home()}: {exc.strerror or exc}") from None
    if args.cache_command == "list":
        def teacher(e):
            if _meta(e, "format") != teacher_cache.CACHE_FORMAT:
                return (f"format {_meta(e, 'format')}: no longer read, remove it with "
                        f"`kdbench cache clear {e.key}`")
            if not isinstance(e, teacher_cache.Entry):
                return (f"damaged (a file missing or of the wrong size): never read, remove it with "
                        f"`kdbench cache clear {e.key}`")
            return f"{_meta(e, 'n_rows')} positions of {_meta(e, 'n_examples')} examples, {_meta(e, 'dtype')}"

        _cache_listing("teacher cache", teacher_cache.cache_root(), entries, teacher)
        _cache_listing("teacher prompt cache", prompt_cache.cache_root(), prompts,
                       lambda e: f"{_meta(e, 'batches')} batches of prompts, {_meta(e, 'inputs', 'dtype')}, "
                                 f"{_meta(e, 'inputs', 'threads')} thread(s)")
        _cache_listing("seqkd teacher responses", seqkd.cache_root(), sets,
                       lambda e: f"{_meta(e, 'examples')} responses, "
                                 f"{'greedy' if _meta(e, 'inputs', 'decoding', 'greedy') else 'sampled'}")
        total = sum(e.size_bytes for e in [*entries, *prompts, *sets])
        print(f"  total {total / 2**20:.1f} MB")
        return 0
    if args.all:
        removed = (teacher_cache.clear(everything=True) + prompt_cache.clear(everything=True)
                   + seqkd.clear(everything=True))
    else:
        known = [e.key for e in [*entries, *prompts, *sets]]
        chosen: list[str] = []
        for k in dict.fromkeys(args.keys):  # every KEY is resolved before anything is removed
            hits = sorted({key for key in known if key == k} or {key for key in known if key.startswith(k)})
            if not hits:
                raise UserError(f"no cache entry matches {k!r} (see `kdbench cache list`)")
            if len(hits) > 1:
                raise UserError(f"KEY {k!r} matches {len(hits)} entries ({', '.join(hits)}): give more of the key "
                                f"of the one to remove")
            chosen += hits
        removed = teacher_cache.clear(chosen) + prompt_cache.clear(chosen) + seqkd.clear(chosen)
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
    from kdbench.device import resolve_device

    resolve_device(args.device)  # a GPU that is not there is refused before anything is written
    from kdbench.lmeval import eval_run

    return eval_run(args)


COMMANDS = {"run": cmd_run, "list": cmd_list, "show": cmd_show, "analyze": cmd_analyze, "eval": cmd_eval,
            "cache": cmd_cache, "leaderboard": cmd_leaderboard, "gc": cmd_gc, "prepare": cmd_prepare,
            "sweep": cmd_sweep}


#: The signal that stopped the command, for its exit status (128 + the signal's number, as a shell reports it).
_stopped_by: list[int] = []


def _terminate(signum, _frame):
    # `kill` (SIGTERM): a run that is training checkpoints at the end of its step and stops
    # (resumable, recorded as interrupted); anything else unwinds like Ctrl-C. Either way the
    # command exits 143, not Ctrl-C's 130.
    from kdbench.lifecycle import GRACEFUL

    _stopped_by.append(signum)
    if not GRACEFUL.request():
        raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    """An error as one line; any URL in it has its password masked (kdbench/secrets.py)."""
    from kdbench.secrets import redact_word

    text = " ".join(redact_word(w) for w in str(exc).split())
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
    _stopped_by.clear()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --num-processes hands each rank
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"kdbench: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except SQLAlchemyError as exc:  # a store that broke after it was opened (corrupt pages, lost server)
        orig = getattr(exc, "orig", None) or exc
        print(f"kdbench: error: run store: {_one_line(orig)}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"kdbench: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        if _stopped_by:
            print("kdbench: terminated", file=sys.stderr)
            return 128 + _stopped_by[-1]
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
