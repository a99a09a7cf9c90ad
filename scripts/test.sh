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
exec .venv/bin/python -m pytest -q "$@"
