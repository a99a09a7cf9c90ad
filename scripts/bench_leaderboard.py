"""Print query times of kdbench.results on a big synthetic store (not a test; a speed check).

    .venv/bin/python scripts/bench_leaderboard.py [--db PATH] [--settings 40] [--seeds 50] [--prompts 20]

Builds the fixture store with ``big=True`` (bulk inserts) unless --db points at an existing store.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fixtures_store import ARITH, CSD_SS, KL, SUITE, TEST, build_fixture_store  # noqa: E402

from kdbench import results as R  # noqa: E402
from kdbench.store import open_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db")
    ap.add_argument("--settings", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=20)
    args = ap.parse_args()
    tmp = None
    db = args.db
    if db is None or not Path(db).exists():
        if db is None:
            tmp = tempfile.TemporaryDirectory()
            db = str(Path(tmp.name) / "big.db")
        t0 = time.perf_counter()
        ids = build_fixture_store(db, big=True, big_settings=args.settings, big_seeds=args.seeds,
                                  big_prompts=args.prompts)
        print(f"built {db}: {ids['big_runs']} synthetic runs in {time.perf_counter() - t0:.1f} s")
    engine = open_engine(db, readonly=True)
    with engine.connect() as c:
        from sqlalchemy import text
        for t in ("runs", "metrics", "samples", "curves"):
            print(f"  {t:8s} {c.execute(text(f'SELECT COUNT(*) FROM {t}')).scalar():>9,d} rows")
    checks = [
        ("store_fingerprint", lambda: R.store_fingerprint(engine)),
        ("list_suites", lambda: R.list_suites(engine)),
        ("default_version", lambda: [R.default_version(engine, SUITE)]),
        ("list_metrics", lambda: R.list_metrics(engine, SUITE)),
        ("leaderboard rougeL (2 tasks + avg)", lambda: R.leaderboard(engine, SUITE, "rougeL")),
        ("leaderboard self_bleu micro/test", lambda: R.leaderboard(engine, SUITE, "self_bleu", [TEST])),
        ("fidelity_diversity", lambda: R.fidelity_diversity(engine, SUITE, TEST)),
        ("compare kl vs csd", lambda: R.compare(engine, SUITE, KL, CSD_SS, "rougeL")),
        ("prompts_differing_most", lambda: R.prompts_differing_most(engine, SUITE, "synth(a=0)", "synth(a=1)", ARITH)),
        ("run_summary", lambda: R.run_summary(engine, 3)),
        ("samples page (with teacher)", lambda: R.samples(engine, 3, limit=20)),
        ("curves", lambda: R.curves(engine, 3)),
    ]
    for name, fn in checks:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        size = len(out) if hasattr(out, "__len__") else ""
        print(f"{name:40s} {dt * 1000:8.1f} ms  ({size} rows)")
    engine.dispose()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
