#!/usr/bin/env bash
# What only a GPU can show, on a machine with one CUDA GPU, in under 10 minutes:
#   1. the tests marked `gpu` (tests/test_gpu.py on cuda): bf16 training steps, fused-AdamW resume bit
#      for bit, peak memory against `megalm plan`, TF32 for fp32, FlexAttention PrefixLM against the
#      dense mask (parity and peak memory), per-document FlexAttention against its dense mask;
#   2. `megalm bench` of configs/gpt-125m.yaml and configs/gpt-1.3b.yaml in bf16 (MFU and the ratios to
#      a plain PyTorch GPT and, when installed, transformers' GPT-2 of the same shape), LM and PrefixLM,
#      compiled layers, recompute selective / full, each to a JSON file (BENCH_SET=quick: LM only);
#   3. the side by side (megalm.bench_peers, docs/performance.md): megalm, Megatron-Core and torchtitan
#      train configs/gpt-1.3b.yaml and configs/llama-1b.yaml on the same tokens; the peers are installed
#      offline from PEER_WHEELS=DIR (scripts/peers/fetch_wheels.sh DIR, run beforehand where PyPI is
#      reachable); without it megalm's rows alone;
#   4. FP8 linears (train.fp8 tensorwise, rowwise) against bf16 at 1.3B: tokens/s and the loss after
#      FP8_STEPS (200) steps, each `megalm bench --no-baseline`; skipped when this checkout has no train.fp8;
#   5. gpu_check.json: the environment, the tests' verdicts and figures, the bench figures (each with the
#      planner's measured/planned tokens/s), the side by side, FP8 against bf16. TP communication overlap
#      needs tp >= 2, more than this one GPU: not measured here (the summary says so).
#
#   scripts/gpu_check.sh OUTPUT_DIR        (or OUT=OUTPUT_DIR scripts/gpu_check.sh)
#
# Time on one H100/H200 (estimates until measured; BUDGET_S, default 480, skips the parts that would start
# after it, each named in the summary): environment 10 s; gpu tests 60-150 s; bench (BENCH_SET=quick: two
# runs) 90 s, full 4 min; side by side 200 s (5 runs: megalm and Megatron-Core at both shapes, torchtitan
# at the Llama one, with its compilation); FP8 250 s (3 eager runs of 200 steps at global batch 4, 2 compiled;
# what passes BUDGET_S is skipped and named: GPU_CHECK_PARTS=fp8 in a second slot). Issue 25's
# one command: BENCH_SET=quick PEER_WHEELS=DIR scripts/gpu_check.sh OUT (about 8 minutes).
# Parts: GPU_CHECK_PARTS (default "tests bench peers fp8") picks them.
#
# The Python environment, first that applies:
#   PYTHON=/path/to/python    use it as it is (it must hold the CUDA build of torch, numpy, pyyaml,
#                             sentencepiece and pytest); the checkout runs from PYTHONPATH
#   VENV (default .venv)      reuse it if it exists
#   a python3 on PATH whose torch is a CUDA build (a GPU image's own): its venv if it is one, else
#                             create VENV from it with --system-site-packages and install megalm into
#                             it (--no-deps, no build isolation: works offline)
#   otherwise                 scripts/setup_env.sh (EXTRAS=dev): torch==TORCH_VERSION from the
#                             configured package index
# A CPU build of torch is refused (exit 3), never benchmarked. `pip install torch==2.13.0` from PyPI
# on Linux x86_64 resolves to torch-2.13.0-cp3XX-manylinux_2_28_x86_64.whl, the CUDA 13.0 build (it
# requires cuda-toolkit 13.0.3, nvidia-cudnn-cu13, nvidia-nccl-cu13 2.29.7; driver >= 580), so
# setup_env.sh on a GPU machine that reaches PyPI gets CUDA; a pip configured for a CPU index or a
# wheel directory of +cpu builds (as on megalm's CPU CI machine) installs 2.13.0+cpu, and then this
# script says so and stops. A machine that reaches no registry (a GPU image with its own torch) is
# served by the python3 branch above. No GPU visible: exit 2.
# Bench sizes (global batch, steps) are cut to fit the time: BENCH_STEPS, BENCH_WARMUP,
# BATCH_125M, BATCH_1_3B override them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() { echo "usage: $0 OUTPUT_DIR   (or set OUT)" >&2; exit 2; }
[[ $# -le 1 ]] || usage
[[ "${1:-}" != "-h" && "${1:-}" != "--help" ]] || usage
OUT_DIR=${1:-${OUT:-}}
[[ -n "$OUT_DIR" ]] || usage
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG" >&2; }
START=$(date +%s)
skipped=()
wanted() { [[ " ${GPU_CHECK_PARTS:-tests bench peers fp8} " == *" $1 "* ]]; }
in_budget() {  # PART: false (and noted) once BUDGET_S seconds have passed
  if (( $(date +%s) - START < ${BUDGET_S:-480} )); then return 0; fi
  say "note: $(( $(date +%s) - START )) s spent, past BUDGET_S=${BUDGET_S:-480}: $1 skipped"
  skipped+=("$1: past BUDGET_S=${BUDGET_S:-480}")
  return 1
}

# ---- 1. the Python environment ------------------------------------------------------------------
VENV=${VENV:-$ROOT/.venv}
torch_kind='import torch; print("cuda" if torch.version.cuda else "cpu")'
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
  say "using PYTHON=$PY"
elif [[ -x "$VENV/bin/python" ]]; then
  PY="$VENV/bin/python"
  say "reusing $VENV"
elif command -v python3 >/dev/null && [[ "$(python3 -c "$torch_kind" 2>/dev/null)" == "cuda" ]]; then
  SYSTEM_PY=$(python3 -c 'import sys; print(sys.executable)')
  if [[ "$(python3 -c 'import sys; print(sys.prefix != sys.base_prefix)')" == "True" ]]; then
    # python3 is itself a venv (a GPU image's /opt/.../.venv): a venv made from it would see the base
    # interpreter's packages, not this one's torch, so this venv is the one to reuse.
    PY=$SYSTEM_PY
    say "reusing the venv of $PY, whose torch is a CUDA build"
  else
    say "creating $VENV from $SYSTEM_PY, whose torch is a CUDA build (--system-site-packages)"
    python3 -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
    if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >>"$LOG" 2>&1; then
      say "note: pip install -e . failed (see $LOG); megalm runs from the checkout via PYTHONPATH"
    fi
  fi
else
  say "no CUDA torch found on python3: installing with scripts/setup_env.sh into $VENV"
  EXTRAS=dev bash scripts/setup_env.sh 2>&1 | tee -a "$LOG"
  PY="$VENV/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# transformers' GPT-2 in the bench needs the hf extra; an offline GPU image without it can be given
# wheels (HF_WHEELS=DIR, e.g. from `pip download transformers safetensors --python-version 3.12
# --only-binary=:all:`): installed beside the image's packages, which keep precedence.
if [[ -n "${HF_WHEELS:-}" ]] && ! "$PY" -c 'import transformers' 2>/dev/null; then
  if "$PY" -m pip install --quiet --no-index --no-deps --target "$ROOT/.hf-packages" "$HF_WHEELS"/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$ROOT/.hf-packages"
    say "transformers installed from $HF_WHEELS into $ROOT/.hf-packages"
  else
    say "note: installing transformers from $HF_WHEELS failed (see $LOG): the bench skips it"
  fi
fi

set +e
"$PY" - >"$OUT_DIR/environment.json" 2>>"$LOG" <<'EOF'
import json, platform, sys
import torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
missing = []
for module in ("numpy", "yaml", "sentencepiece", "pytest"):
    try:
        __import__(module)
    except ImportError:
        missing.append(module)
info["missing_modules"] = missing
print(json.dumps(info, indent=1))
EOF
status=$?
set -e
if [[ $status -ne 0 ]]; then
  say "$PY cannot import torch (see $LOG)"
  exit 3
fi
read -r TORCH TORCH_CUDA AVAILABLE MISSING < <("$PY" -c '
import json, sys
i = json.load(open(sys.argv[1]))
print(i["torch"], i["torch_cuda"], i["cuda_available"], ",".join(i["missing_modules"]) or "-")' "$OUT_DIR/environment.json")
if [[ "$TORCH_CUDA" == "None" ]]; then
  say "torch $TORCH in $PY is a CPU build: this check would time the CPU. Install the CUDA build:"
  say "  $PY -m pip install --force-reinstall torch==${TORCH_VERSION:-2.13.0} --index-url https://pypi.org/simple"
  say "(PyPI's Linux x86_64 torch 2.13.0 is the CUDA 13.0 build: NVIDIA driver >= 580), or from"
  say "https://download.pytorch.org/whl/cu126 (or cu128) for an older driver; or set PYTHON to an interpreter that has it"
  exit 3
fi
if [[ "$AVAILABLE" != "True" ]]; then
  say "torch $TORCH (CUDA $TORCH_CUDA) sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES"
  exit 2
fi
if [[ "$MISSING" != "-" ]]; then
  say "$PY lacks $MISSING: install them (pip install $(tr , ' ' <<<"$MISSING" | sed 's/yaml/pyyaml/'))"
  exit 3
fi
[[ "$TORCH" == "${TORCH_VERSION:-2.13.0}"* ]] || say "note: torch $TORCH, not the pinned ${TORCH_VERSION:-2.13.0}"
say "torch $TORCH, CUDA $TORCH_CUDA, $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# ---- 2. the gpu tests ---------------------------------------------------------------------------
failed=()
rm -f "$OUT_DIR/gpu_tests.jsonl"
if wanted tests; then
say "pytest -m gpu tests/test_gpu.py"
set +e
CUBLAS_WORKSPACE_CONFIG=:4096:8 MEGALM_GPU_CHECK_OUT="$OUT_DIR/gpu_tests.jsonl" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} \
  timeout 300 "$PY" -m pytest -q -rA -m gpu tests/test_gpu.py --junitxml "$OUT_DIR/gpu_tests.xml" \
  >"$OUT_DIR/gpu_tests.log" 2>&1
status=$?
set -e
tail -n 5 "$OUT_DIR/gpu_tests.log" | tee -a "$LOG" >&2
[[ $status -eq 0 ]] || failed+=("gpu tests (exit $status)")
fi

# ---- 3. megalm bench ----------------------------------------------------------------------------
bench() {  # NAME CONFIG GLOBAL_BATCH [STEPS [BENCH ARGS AND OVERRIDES ...]]
  local name=$1 config=$2 batch=$3 steps=${4:-${BENCH_STEPS:-5}}
  shift $(( $# < 4 ? $# : 4 ))
  say "megalm bench $config $* (bf16, global batch $batch, $steps steps)"
  set +e
  timeout 240 "$PY" -m megalm.cli bench "$config" train.device=cuda train.precision=bf16 "train.global_batch_size=$batch" \
    "$@" --steps "$steps" --warmup "${BENCH_WARMUP:-2}" --json "$OUT_DIR/bench_$name.json" \
    >"$OUT_DIR/bench_$name.log" 2>&1
  local code=$?
  set -e
  tail -n 14 "$OUT_DIR/bench_$name.log" | tee -a "$LOG" >&2
  [[ $code -eq 0 ]] || failed+=("bench $name (exit $code)")
}
# Against plain PyTorch and transformers' GPT-2 (when installed): LM and PrefixLM at both sizes, and
# compiled layers (the baselines' blocks compiled too). The recompute modes, compile and PrefixLM at
# 1.3b are megalm alone (--no-baseline), fewer steps. BENCH_SET=quick: the two LM rows only.
B125=${BATCH_125M:-64} B13=${BATCH_1_3B:-16} VSTEPS=${VARIANT_STEPS:-3}
if wanted bench && in_budget bench; then
bench gpt-125m configs/gpt-125m.yaml "$B125"
bench gpt-1.3b configs/gpt-1.3b.yaml "$B13"
fi
if wanted bench && [[ "${BENCH_SET:-full}" != quick ]] && in_budget "bench variants"; then
  bench gpt-125m-prefixlm configs/gpt-125m.yaml "$B125" "$VSTEPS" model.family=prefixlm
  bench gpt-125m-compile configs/gpt-125m.yaml "$B125" "$VSTEPS" train.compile=true --no-transformers
  bench gpt-1.3b-selective configs/gpt-1.3b.yaml "$B13" "$VSTEPS" parallel.recompute=selective --no-baseline
  bench gpt-1.3b-full configs/gpt-1.3b.yaml "$B13" "$VSTEPS" parallel.recompute=full --no-baseline
  bench gpt-1.3b-compile configs/gpt-1.3b.yaml "$B13" "$VSTEPS" train.compile=true --no-baseline
  bench gpt-1.3b-prefixlm configs/gpt-1.3b.yaml "$B13" "$VSTEPS" model.family=prefixlm --no-baseline
fi

# ---- 4. the side by side with the peers ------------------------------------------------------------
# PEER_STEPS / PEER_WARMUP timed and untimed steps, PEER_BATCH the global batch (micro-batch 4 as the
# configs say), PEER_CONFIGS and PEER_SYSTEMS what runs, PEER_TIMEOUT seconds per run (PEER_DEVICE=cpu: the
# tests run this part on a CPU).
if wanted peers && in_budget "side by side"; then
  peer_path=""
  if [[ -n "${PEER_WHEELS:-}" ]]; then
    if peer_path=$(PYTHON="$PY" bash scripts/peers/install_wheels.sh "$PEER_WHEELS" 2>>"$LOG"); then
      say "peers installed from $PEER_WHEELS into $peer_path"
    else
      say "note: installing the peers from $PEER_WHEELS failed (see $LOG): their rows say why"
      peer_path=""
    fi
  else
    say "note: no PEER_WHEELS: the side by side runs megalm alone (scripts/peers/fetch_wheels.sh DIR makes them)"
  fi
  say "side by side: ${PEER_CONFIGS:-configs/gpt-1.3b.yaml configs/llama-1b.yaml} (global batch ${PEER_BATCH:-8})"
  set +e
  # shellcheck disable=SC2086 # one argument per config
  PYTHONPATH="$PYTHONPATH${peer_path:+:$peer_path}" timeout 600 "$PY" -m megalm.bench_peers run \
    ${PEER_CONFIGS:-configs/gpt-1.3b.yaml configs/llama-1b.yaml} --out "$OUT_DIR/peers" \
    --override "train.device=${PEER_DEVICE:-cuda}" --override "train.global_batch_size=${PEER_BATCH:-8}" \
    --steps "${PEER_STEPS:-5}" --warmup "${PEER_WARMUP:-2}" --timeout "${PEER_TIMEOUT:-200}" \
    --systems "${PEER_SYSTEMS:-megalm,megatron-core,torchtitan}" >"$OUT_DIR/peers.log" 2>&1
  status=$?
  set -e
  tail -n 12 "$OUT_DIR/peers.log" | tee -a "$LOG" >&2
  [[ $status -eq 0 ]] || failed+=("side by side (exit $status)")
fi

# ---- 5. FP8 linears against bf16 ----------------------------------------------------------------------
# FP8_MODES (default "tensorwise rowwise"), FP8_STEPS steps in all (the loss after the last is compared),
# FP8_BATCH the global batch at 1.3B.
if wanted fp8 && in_budget "fp8"; then
  if "$PY" -c 'import dataclasses, sys; from megalm.config.sections import TrainConfig
sys.exit("fp8" not in {field.name for field in dataclasses.fields(TrainConfig)})' 2>>"$LOG"; then
    fsteps=${FP8_STEPS:-200} fwarm=10
    for mode in bf16 ${FP8_MODES:-tensorwise rowwise}; do
      in_budget "fp8 $mode" || break
      fp8=(); [[ $mode == bf16 ]] || fp8=("train.fp8=$mode")
      BENCH_WARMUP=$fwarm bench "gpt-1.3b-fp8-$mode" configs/gpt-1.3b.yaml "${FP8_BATCH:-4}" $(( fsteps - fwarm )) \
        "${fp8[@]}" --no-baseline
    done
    # compiled layers fuse the casts that eager FP8 launches one by one (the planner plans eager FP8 as
    # host-bound at 1.3B, docs/plan.md): FP8_COMPILE_MODES (default "tensorwise"; empty: skip) against
    # compiled bf16, the same steps
    if [[ -n "${FP8_COMPILE_MODES-tensorwise}" ]]; then
      for mode in bf16 ${FP8_COMPILE_MODES-tensorwise}; do
        in_budget "fp8 compiled $mode" || break
        fp8=(); [[ $mode == bf16 ]] || fp8=("train.fp8=$mode")
        BENCH_WARMUP=$fwarm bench "gpt-1.3b-fp8-compiled-$mode" configs/gpt-1.3b.yaml "${FP8_BATCH:-4}" \
          $(( fsteps - fwarm )) "${fp8[@]}" train.compile=true --no-baseline
      done
    fi
  else
    say "note: this checkout has no train.fp8 config key: FP8 skipped"
    skipped+=("fp8: no train.fp8 in this checkout")
  fi
fi

# ---- 6. the summary -----------------------------------------------------------------------------
printf '%s\n' "${skipped[@]}" >"$OUT_DIR/skipped.txt"
"$PY" scripts/gpu_check_summary.py "$OUT_DIR" "$(( $(date +%s) - START ))" "${failed[@]}" | tee -a "$LOG"
if (( ${#failed[@]} )); then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all passed in $(( $(date +%s) - START )) s; results in $OUT_DIR"
