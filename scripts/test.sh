#!/usr/bin/env bash
# Install megalm with its test tools and optional extras into .venv and run the test suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The optional extras (the DeepSpeed engine, Hugging Face transformers, TensorBoard, lm-evaluation-harness) are
# installed too, so their tests run rather than skip.
EXTRAS=dev,deepspeed,hf,tensorboard,lmeval bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Every test runs (no marker is deselected); the 15 slowest are listed at the end. Two pytest-xdist
# workers (MEGALM_TEST_WORKERS; 0 runs in this process), each given whole files, so a module's shared
# fixture is built once; tests/conftest.py hands out the files with the most slow tests first. A
# single-process test uses one core, and the other would idle.
exec .venv/bin/python -m pytest -q -ra -n "${MEGALM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
