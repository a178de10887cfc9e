#!/usr/bin/env bash
# Install megalm into .venv and train the tiny GPT on the built-in token stream (CPU is enough).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
megalm train configs/tiny.yaml --run-dir runs/quickstart "$@"
python - <<'PY'
import math
from megalm.config import load_config
from megalm.data.synthetic import SyntheticTokenStream
from megalm.metrics import read_metrics
config = load_config("runs/quickstart/config.yaml")
floor = SyntheticTokenStream(config.model.vocab_size, config.model.seq_length, config.train.seed).entropy()
records = read_metrics("runs/quickstart/metrics.jsonl")
first, last = records[0]["loss"], records[-1]["loss"]
print(f"quickstart: loss {first:.3f} -> {last:.3f} over {len(records)} steps "
      f"(random guessing: ln {config.model.vocab_size} = {math.log(config.model.vocab_size):.3f}; "
      f"a perfect model of the token stream: {floor:.3f})")
assert last < first - 2.0, "the loss did not fall: something is wrong"
PY
