#!/usr/bin/env bash
# The main job, end to end on CPU: install into .venv, generate the embedded bilingual corpus,
# train a tokenizer, preprocess to token files, train the tiny GPT with tp=2 x dp=2 (4 processes)
# and print sample text, compare the final loss with a unigram model of the corpus, then generate
# from the checkpoint it saved with `megalm generate` and evaluate it with `megalm eval`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
out=runs/quickstart
mkdir -p "$out/data" "$out/tokenizer"

megalm data corpus "$out/data/corpus.jsonl" --size-mb 2 --seed 0
megalm tokenizer train --input "$out/data/corpus.jsonl" --output "$out/tokenizer/megalm-sample" --vocab-size 2048
megalm preprocess --input "$out/data/corpus.jsonl" --output-prefix "$out/data/corpus" \
  --tokenizer "$out/tokenizer/megalm-sample.model" --workers 2
python -m torch.distributed.run --standalone --nproc-per-node 4 -m megalm.cli train configs/tiny-corpus.yaml "$@"

python - <<'PY'
from megalm.config import load_config
from megalm.data.indexed import IndexedDataset
from megalm.data.inspect import unigram_entropy
from megalm.metrics import read_metrics

config = load_config("runs/quickstart/config.yaml")
records = read_metrics("runs/quickstart/metrics.jsonl", across_restarts=True)  # a re-run resumes
unigram = unigram_entropy(IndexedDataset(config.data.paths[0]))
valid = [r["valid_loss"] for r in records if "valid_loss" in r]
print(f"quickstart: train loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f} over {len(records)} steps; "
      f"valid loss {valid[-1]:.3f}; a model that only learned unigram frequencies: {unigram:.3f}")
assert valid[-1] < unigram - 1.0, "the model did not beat the unigram baseline clearly"
PY

# Generate from the checkpoint it saved (tp 2 as trained; any layout loads): greedy, with a KV cache.
python -m torch.distributed.run --standalone --nproc-per-node 2 -m megalm.cli generate runs/quickstart --tp 2 \
  --prompt "Lena lives in" --prompt "王芳今年" --prompt "What is four times ten? It is" --max-new-tokens 16

# Evaluate it: zero-shot accuracy on the built-in world task against chance, calibrated and not: on the
# facts the corpus holds out (world) and on those it states (world-seen).
megalm eval runs/quickstart --task world --task world-seen
