#!/usr/bin/env bash
# Install fedfuse with its test extras. The CPU build of torch goes first: a bare `torch`
# requirement could otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
