#!/usr/bin/env bash
# Install megalm with its test tools and optional extras into .venv and run the test suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The optional extras (the DeepSpeed engine, Hugging Face transformers, TensorBoard, lm-evaluation-harness) are
# installed too, so their tests run rather than skip.
EXTRAS=dev,deepspeed,hf,tensorboard,lmeval bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Every test runs (no marker is deselected); the 15 slowest are listed at the end.
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
