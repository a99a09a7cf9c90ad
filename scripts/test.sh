#!/usr/bin/env bash
# The test command: sets up from nothing (idempotent), installs Debian's chromium for the
# browser test, lints (ruff), then runs the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# lint first: a finding fails the test command (rules: pyproject.toml [tool.ruff])
.venv/bin/ruff check kdbench leaderboard_app tests benchmarks scripts objectives
# One pytest-xdist worker per core, at most 4 (KDBENCH_TEST_WORKERS overrides; 0 runs in this
# process); each worker uses one thread (tests/conftest.py). --dist loadfile keeps a test file
# on one worker, so a module's fixtures (tiny models, runs) are built once.
workers=${KDBENCH_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
