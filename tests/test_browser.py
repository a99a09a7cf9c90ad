"""The leaderboard in a real browser: `streamlit run` on the fixture store, driven by Playwright through the
system Chromium (never `playwright install`; scripts/install_browser.sh installs /usr/bin/chromium).

Every wait is bounded; the server is always killed. Screenshots land in the test's tmp_path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from tests.fixtures_store import CSD_SS, CSD_TS, KL, RKL, TEST, build_fixture_store
    from tests.store_helpers import store_location
except ImportError:  # tests/ itself on sys.path
    from fixtures_store import CSD_SS, CSD_TS, KL, RKL, TEST, build_fixture_store
    from store_helpers import store_location

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: run scripts/install_browser.sh (CI's .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright not installed (pip install playwright)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"streamlit not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path):
    db = store_location(tmp_path)
    build_fixture_store(db)
    port = _free_port()
    log = tmp_path / "streamlit.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env.pop("KDBENCH_DB", None)
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "leaderboard_app" / "app.py"),
           "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", "--", "--db", str(db)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/_stcore/health", log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def grid_rows(page) -> list[list[str]]:
    """Cell texts of the first st.dataframe (Glide draws on a canvas; its accessible table holds the values)."""
    return page.evaluate(
        "() => Array.from(document.querySelectorAll('[data-testid=stDataFrame] table[role=grid] tr'))"
        ".map(r => Array.from(r.children).map(c => c.textContent))")


def as_records(rows: list[list[str]]) -> dict[str, dict[str, str]]:
    header, *body = rows
    return {r[0]: dict(zip(header, r)) for r in body}


def test_leaderboard_in_chromium(server, tmp_path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server, timeout=WAIT_MS)
            page.get_by_role("heading", name="Leaderboard").wait_for()
            cell = "[data-testid=stDataFrame] table[role=grid] td"
            page.locator(cell, has_text=CSD_TS).first.wait_for(state="attached")

            rows = grid_rows(page)
            assert [r[0] for r in rows[1:]] == ["teacher", "student-init", CSD_TS, CSD_SS, KL, RKL]
            rec = as_records(rows)
            assert float(rec[KL][TEST]) == pytest.approx(22.0) and rec[KL]["Rank"] == "3"
            assert rec[CSD_TS]["vs best"] == "★ best" and rec[CSD_SS]["vs best"] == "≈ best"
            assert rec["teacher"]["Role"] == "reference"
            assert page.get_by_text("1 failed run(s) in micro v1").is_visible()

            # the formatted means: the paper-style Markdown table, after opening its expander
            page.get_by_text("Paper-style table (Markdown)").click()
            code = page.locator("[data-testid=stCode]").first
            code.wait_for(state="visible")
            md = code.text_content()
            assert "| kl | 40.00 ± 1.48 | 22.00 ± 1.48 | 31.00 ± 1.48 | 3 | -2.25 [" in md
            assert "Smallest resolvable difference in rougeL" in md
            # the equivalence class note under the table
            assert page.get_by_text(f"Equivalence class ∥1: {CSD_SS} ∥ rkl: same direction").first.is_visible()
            page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)

            # switch the metric: self_bleu is lower-is-better, kl moves to the top
            page.get_by_test_id("stSelectbox").filter(has_text="Metric").click()
            page.get_by_role("option", name="self_bleu", exact=True).click()
            page.get_by_text("self_bleu: lower is better").first.wait_for()
            page.wait_for_function(
                "() => { const r = document.querySelectorAll('[data-testid=stDataFrame] table[role=grid] tr');"
                " return r.length > 3 && r[3].children[0].textContent === 'kl'; }", timeout=WAIT_MS)
            rec = as_records(grid_rows(page))
            assert float(rec[KL][TEST]) == pytest.approx(30.0) and rec[KL]["vs best"] == "★ best"
            assert rec[CSD_SS]["Rank"] == "4"
            page.screenshot(path=str(tmp_path / "leaderboard_self_bleu.png"), full_page=True)

            # another page: the Altair fidelity–diversity chart renders
            page.get_by_test_id("stSidebar").get_by_text("Fidelity vs diversity").click()
            page.get_by_role("heading", name="Fidelity vs diversity").wait_for()
            page.locator("[data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg").first.wait_for()
            page.screenshot(path=str(tmp_path / "fidelity.png"), full_page=True)

            # every other page renders in the browser without a Python exception box
            pages = (("Run detail", "Mean over sampling seeds"), ("Compare", "Prompts where they differ most"),
                     ("Objectives", "Gradient similarity"))
            for name, ready in pages:
                page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()
                page.get_by_role("heading", name=name).first.wait_for()
                page.get_by_text(ready).first.wait_for()
                assert page.locator("[data-testid=stException]").count() == 0, name
                page.screenshot(path=str(tmp_path / f"{name.split()[0].lower()}.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    for name in ("leaderboard.png", "leaderboard_self_bleu.png", "fidelity.png", "run.png", "compare.png",
                 "objectives.png"):
        assert (tmp_path / name).stat().st_size > 10_000
