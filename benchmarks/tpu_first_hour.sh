#!/usr/bin/env bash
# The first hour on a TPU VM (v5e-8, v6e-8, v5p-8) or a GPU host: measure, predict, compare.
#
#   benchmarks/tpu_first_hour.sh [OUT_DIR] [more benchmarks/first_hour.py flags]
#
# 1. benchmarks/first_hour.py: AR and SSD tokens/s at batch 1, 8, 32 (random bf16 weights of
#    LLaVA-1.5-7B unless --ckpt / --arch), the round's piece times, the imitation training
#    step's time and peak HBM -> OUT_DIR/first_hour.json;
# 2. on a TPU only (the slice's name comes from the JSON): the compile-only predictions for the
#    same slice, mesh, batches and budget (decode.bench and train.run --compile-only, libtpu's
#    compiler, which a TPU VM's jax[tpu] brings) -> OUT_DIR/{decode,train}_compile_only.json;
# 3. benchmarks/first_hour_compare.py: predicted next to measured, and their ratio.
#
# It installs nothing (first: pip install -e '.[tpu]' on a TPU VM, pip install -e '.[cuda]' on
# a GPU host) and prints every command before running it. Environment: PYTHON (python),
# ARCH (llava15_7b), BATCHES ("1 8 32"), MAX_NEW (128), DRAFT_LEN (5), PREDICT (1; 0 skips 2-3),
# MEASURE (1; 0 skips 1 and predicts for an existing OUT_DIR/first_hour.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-first_hour}
shift || true
ARCH=${ARCH:-llava15_7b}
BATCHES=${BATCHES:-1 8 32}
MAX_NEW=${MAX_NEW:-128}
DRAFT_LEN=${DRAFT_LEN:-5}
mkdir -p "$OUT"

run() {
  echo "+ $*" >&2
  "$@"
}

if [ "${MEASURE:-1}" = 1 ]; then
  # shellcheck disable=SC2086  # BATCHES is a list of words
  run "$PY" benchmarks/first_hour.py --arch "$ARCH" --batch-size $BATCHES --max-new-tokens "$MAX_NEW" \
      --draft-len "$DRAFT_LEN" --json "$OUT/first_hour.json" "$@"
fi

field() {  # a value of the measured JSON, by a Python expression over `r`
  "$PY" -c "import json; r = json.load(open('$OUT/first_hour.json')); print($1)"
}
TOPOLOGY=$(field "r['topology'] or ''")
if [ -z "$TOPOLOGY" ] || [ "${PREDICT:-1}" = 0 ]; then
  echo "no compile-only predictions (${TOPOLOGY:-not a TPU}; PREDICT=${PREDICT:-1}): measured only, in $OUT/first_hour.json" >&2
  exit 0
fi
MODEL=$(field "r['model']")
DTYPE=$(field "r['dtype']")
predicted=()
if [ "$(field "'runs' in r")" = True ]; then
  MESH=$(field "','.join(f'{k}={v}' for k, v in r['mesh'].items())")
  # shellcheck disable=SC2086
  run "$PY" -m decode.bench --ckpt "$MODEL" --compile-only "$TOPOLOGY" --mesh "$MESH" --batch-size $BATCHES \
      --draft-len "$DRAFT_LEN" --max-new-tokens "$MAX_NEW" --dtype "$DTYPE" --json "$OUT/decode_compile_only.json" || true
  predicted+=("$OUT/decode_compile_only.json")
fi
arch=$(field "r['model'].split(':', 1)[1] if r['model'].startswith('shapes:') else ''")
if [ "$(field "'train' in r")" = True ] && [ -z "$arch" ]; then
  echo "no training prediction: $MODEL is not a named architecture (shapes:NAME)" >&2
elif [ "$(field "'train' in r")" = True ]; then
  overrides=$(field "' '.join([f\"batch_size={r['train']['batch_size']}\", f\"seq_len={r['train']['seq_len']}\", f\"compute_dtype={r['dtype']}\"] + [f'mesh.{k}={v}' for k, v in r['train']['mesh'].items()])")
  # shellcheck disable=SC2086
  run "$PY" -m train.run --config configs/llava15_7b.py:imitation --compile-only "$TOPOLOGY" \
      --json "$OUT/train_compile_only.json" $overrides "architecture=$arch" || true
  predicted+=("$OUT/train_compile_only.json")
fi
existing=()
for p in "${predicted[@]}"; do [ -f "$p" ] && existing+=("$p"); done
if [ ${#existing[@]} -gt 0 ]; then
  run "$PY" benchmarks/first_hour_compare.py "$OUT/first_hour.json" "${existing[@]}" --json "$OUT/compare.json"
fi
