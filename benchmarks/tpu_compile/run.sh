#!/usr/bin/env bash
# Compile-only runs for LLaVA-1.5-7B on named TPU topologies (nothing runs on a TPU; libtpu's
# compiler on this CPU host). Usage: benchmarks/tpu_compile/run.sh CHAIN, CHAIN in {train, train-stages, refine-stages, decode, decode-batches, int8, drafters, trees,
# gemma3-decode, gemma3-train, qwen25vl-decode, qwen25vl-plan, qwen25vl-train, continuous, bytes}.
# Each command's console output goes to benchmarks/tpu_compile/NAME.log, its report to NAME.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=benchmarks/tpu_compile

run() {  # NAME COMMAND...
  local name=$1; shift
  echo "\$ $*" > "$OUT/$name.log"
  local start=$(date +%s)
  "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "exit $rc after $(( $(date +%s) - start )) s" >> "$OUT/$name.log"
  echo "$name: exit $rc after $(( $(date +%s) - start )) s"
}

case "${1:-}" in
  train)
    run llava15_7b_imitation_v5e_4x8 $PY -m train.run --config configs/llava15_7b.py:imitation \
        --compile-only v5e:4x8 --json $OUT/llava15_7b_imitation_v5e_4x8.json
    run llava15_7b_imitation_v5p_2x2x4 $PY -m train.run --config configs/llava15_7b.py:imitation \
        --compile-only v5p:2x2x4 --json $OUT/llava15_7b_imitation_v5p_2x2x4.json
    run llava15_7b_refine_v5e_4x8 $PY -m train.run --config configs/llava15_7b.py:refine \
        --compile-only v5e:4x8 --json $OUT/llava15_7b_refine_v5e_4x8.json
    ;;
  decode)
    run decode_llava15_7b_v5e_2x2 $PY -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 \
        --mesh data=1,tensor=4 --batch-size 1 8 --draft-len 5 --max-new-tokens 64 --acceptance 0.7 \
        --json $OUT/decode_llava15_7b_v5e_2x2.json
    run llava15_13b_imitation_v5e_4x8 $PY -m train.run --config configs/llava15_13b.py:imitation \
        --compile-only v5e:4x8 --json $OUT/llava15_13b_imitation_v5e_4x8.json
    ;;
  drafters)
    # The round's pieces per drafter (imitation, EAGLE head without and with its 4x visual
    # compressor, a 160M draft VLM) and each drafter's whole generate program (peak memory).
    run decode_drafters_llava15_7b_v5e_2x2 $PY -m decode.bench --ckpt shapes:llava15_7b_eagle \
        --compile-only v5e:2x2 --mesh data=1,tensor=4 --batch-size 1 8 --draft-len 5 --max-new-tokens 64 \
        --acceptance 0.6 --drafter imitation eagle eagle:pool=4 model:shapes:llava_draft_160m \
        --json $OUT/decode_drafters_llava15_7b_v5e_2x2.json
    # The same pieces on 4 v5p chips, up to batch 32 (pieces only: --no-generate).
    run decode_drafters_llava15_7b_v5p_2x2x1 $PY -m decode.bench --ckpt shapes:llava15_7b_eagle \
        --compile-only v5p:2x2x1 --mesh data=1,tensor=4 --batch-size 1 8 32 --draft-len 5 --max-new-tokens 64 \
        --acceptance 0.6 --drafter imitation eagle eagle:pool=4 model:shapes:llava_draft_160m --no-generate \
        --json $OUT/decode_drafters_llava15_7b_v5p_2x2x1.json
    ;;
  trees)
    # The imitation drafter's chain (draft_len 5) and draft trees 8x2 and 16x2: each tree's
    # root pass, drafting step, verification and path move; tokens per round measured on
    # the demo (its batch-1 chain and tree runs). Pieces only (--no-generate).
    run decode_trees_llava15_7b_v5e_2x2 $PY -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 \
        --mesh data=1,tensor=4 --batch-size 1 8 --draft-len 5 --tree-nodes 8 16 --tree-width 2 \
        --max-new-tokens 64 --acceptance benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json \
        --no-generate --json $OUT/decode_trees_llava15_7b_v5e_2x2.json
    ;;
  decode-batches)
    # LLaVA-1.5-7B and 13B at batch 1, 8, 32, 64 on v5e and v5p slices: the round's pieces
    # (--no-generate: their peaks hold the weights and the whole KV cache), predicted at the
    # demo's measured chain profile (draft 5: 3.64 tokens per round) and at the acceptance the
    # paper's 1.55x / 1.85x imply (the default --paper-speedup). 13B on v5e takes 8 chips.
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "llava15_7b v5e:2x2 v5e_2x2 data=1,tensor=4" "llava15_7b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4" \
                "llava15_13b v5e:2x4 v5e_2x4 data=1,tensor=8" "llava15_13b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4"; do
      set -- $spec
      run decode_batches_$1_$3 $PY -m decode.bench --ckpt shapes:$1 --compile-only $2 --mesh $4 \
          --batch-size 1 8 32 64 --draft-len 5 --max-new-tokens 64 --acceptance $ACC --no-generate \
          --json $OUT/decode_batches_$1_$3.json
    done
    ;;
  bytes)
    # Issue 28: where each piece's compiled bytes go (--explain), LLaVA-1.5-7B at batch 1, 8, 32
    # on v5e and v5p (the decode-batches pieces, with the named scopes and the HBM estimate).
    # Writes decode_bytes_qkv_*: the programs with the q/k/v projections kept apart from RoPE
    # (fastvlm_jax.nn.layers.projections_apart). decode_bytes_llava15_7b_* are the same command's
    # reports from before that change (commit 72358c9), kept for the comparison.
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "v5e:2x2 v5e_2x2" "v5p:2x2x1 v5p_2x2x1"; do
      set -- $spec
      run decode_bytes_qkv_llava15_7b_$2 $PY -m decode.bench --ckpt shapes:llava15_7b --compile-only $1 \
          --mesh data=1,tensor=4 --batch-size 1 8 32 --draft-len 5 --max-new-tokens 64 --acceptance $ACC \
          --no-generate --explain 12 --json $OUT/decode_bytes_qkv_llava15_7b_$2.json
    done
    # Gemma 3 4B at batch 8 on v5p (its q kernels were copied the same way; *_b8 without _qkv:
    # the same command before the change).
    run decode_bytes_qkv_gemma3_4b_v5p_2x2x1_b8 $PY -m decode.bench --ckpt shapes:gemma3_4b --compile-only v5p:2x2x1 \
        --mesh data=1,tensor=4 --batch-size 8 --draft-len 5 --max-new-tokens 64 --acceptance $ACC \
        --no-generate --explain 12 --json $OUT/decode_bytes_qkv_gemma3_4b_v5p_2x2x1_b8.json
    ;;
  int8)
    # Int8 weight-only decoding (fastvlm_jax.nn.quant) against bfloat16: LLaVA-1.5-7B and 13B
    # at batch 1 and 8, the round's pieces, at the same measured chain profile as decode-batches.
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "llava15_7b v5e:2x2 v5e_2x2 data=1,tensor=4" "llava15_13b v5e:2x4 v5e_2x4 data=1,tensor=8"; do
      set -- $spec
      for weights in int8 bf16; do
        quantize=(); [ $weights = int8 ] && quantize=(--quantize int8)
        run decode_${weights}_$1_$3 $PY -m decode.bench --ckpt shapes:$1 --compile-only $2 --mesh $4 \
            --batch-size 1 8 --draft-len 5 --max-new-tokens 64 --acceptance $ACC --no-generate "${quantize[@]}" \
            --json $OUT/decode_${weights}_$1_$3.json
      done
    done
    ;;
  train-stages)
    # Every training stage of LLaVA-1.5-7B and 13B on v5e and v5p slices, with the loss
    # window (LM head only where loss is) and the base stage's remat (issue 16).
    for spec in "llava15_7b base v5e:4x8 v5e_4x8" "llava15_7b imitation v5e:4x8 v5e_4x8" \
                "llava15_7b base v5p:2x2x4 v5p_2x2x4" "llava15_13b imitation v5p:2x2x4 v5p_2x2x4" \
                "llava15_13b imitation v5e:4x8 v5e_4x8" "llava15_7b imitation v5p:2x2x4 v5p_2x2x4" \
                "llava15_13b base v5e:4x8 v5e_4x8" "llava15_13b base v5p:2x2x4 v5p_2x2x4" \
                "llava15_7b eagle v5e:4x8 v5e_4x8"; do
      set -- $spec
      run stages_$1_$2_$4 $PY -m train.run --config configs/$1.py:$2 --compile-only $3 \
          --json $OUT/stages_$1_$2_$4.json
    done
    ;;
  refine-stages)
    for spec in "llava15_7b v5e:4x8 v5e_4x8" "llava15_13b v5p:2x2x4 v5p_2x2x4"; do
      set -- $spec
      run stages_$1_refine_$3 $PY -m train.run --config configs/$1.py:refine --compile-only $2 \
          --json $OUT/stages_$1_refine_$3.json
    done
    ;;
  gemma3-decode)
    # Gemma 3 4B / 12B / 27B: the round's pieces at batch 1, 8, 32 (tensor parallel over the
    # slice's chips; 27B takes 8 v5e chips), at the demo's measured chain profile.
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "gemma3_4b v5e:2x2 v5e_2x2 data=1,tensor=4" "gemma3_4b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4" \
                "gemma3_12b v5e:2x2 v5e_2x2 data=1,tensor=4" "gemma3_12b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4" \
                "gemma3_27b v5e:2x4 v5e_2x4 data=1,tensor=8" "gemma3_27b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4"; do
      set -- $spec
      run decode_batches_$1_$3 $PY -m decode.bench --ckpt shapes:$1 --compile-only $2 --mesh $4 \
          --batch-size 1 8 32 --draft-len 5 --max-new-tokens 64 --acceptance $ACC --no-generate \
          --json $OUT/decode_batches_$1_$3.json
    done
    ;;
  qwen25vl-decode)
    # Qwen2.5-VL-7B (issue 29): the round's pieces, the prefill and the vision tower alone
    # (--prefill) at batch 1, 8, 32, with images padded to the largest patch bucket (1280 tokens,
    # 5120 patches per row) and to a 256-token one (1024 patches), at the demo's chain profile.
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "qwen25vl_7b v5e:2x2 v5e_2x2 data=1,tensor=4" "qwen25vl_7b v5p:2x2x1 v5p_2x2x1 data=1,tensor=4"; do
      set -- $spec
      for tokens in 1280 256; do
        run decode_batches_$1_$3_img$tokens $PY -m decode.bench --ckpt shapes:$1 --compile-only $2 --mesh $4 \
            --batch-size 1 8 32 --draft-len 5 --max-new-tokens 64 --acceptance $ACC --no-generate --prefill \
            --image-tokens $tokens --json $OUT/decode_batches_$1_$3_img$tokens.json
      done
    done
    ;;
  qwen25vl-plan)
    # Qwen2.5-VL-3B and 32B at batch 8 (1280 image tokens): 3B on 4 v5e chips, 32B on 16 v5e
    # chips and 8 v5p chips (tensor parallel over 8 of them: the decoder's 8 KV heads).
    ACC=benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json
    for spec in "qwen25vl_3b v5e:2x2 v5e_2x2 data=1,tensor=4" "qwen25vl_32b v5e:4x4 v5e_4x4 data=2,tensor=8" \
                "qwen25vl_32b v5p:2x2x2 v5p_2x2x2 data=1,tensor=8"; do
      set -- $spec
      run decode_batches_$1_$3_img1280 $PY -m decode.bench --ckpt shapes:$1 --compile-only $2 --mesh $4 \
          --batch-size 8 --draft-len 5 --max-new-tokens 64 --acceptance $ACC --no-generate --prefill \
          --image-tokens 1280 --json $OUT/decode_batches_$1_$3_img1280.json
    done
    ;;
  gemma3-train)
    # Every draft stage of the Gemma 3 configs (imitation, refine, eagle) on a v5e and a v5p slice.
    for spec in "gemma3_4b v5e:2x4 v5e_2x4" "gemma3_4b v5p:2x2x1 v5p_2x2x1" \
                "gemma3_12b v5e:4x4 v5e_4x4" "gemma3_12b v5p:2x2x2 v5p_2x2x2" \
                "gemma3_27b v5e:4x4 v5e_4x4" "gemma3_27b v5p:2x2x4 v5p_2x2x4"; do
      set -- $spec
      for stage in imitation refine eagle; do
        run stages_$1_${stage}_$3 $PY -m train.run --config configs/$1.py:$stage --compile-only $2 \
            --json $OUT/stages_$1_${stage}_$3.json
      done
    done
    ;;
  qwen25vl-train)
    # The imitation and eagle stages of configs/qwen25vl_7b.py (images padded to 2560 patch rows,
    # 640 tokens; each row its own prompt length and loss window) on a v5e and a v5p slice.
    for spec in "qwen25vl_7b v5e:4x4 v5e_4x4" "qwen25vl_7b v5p:2x2x2 v5p_2x2x2"; do
      set -- $spec
      for stage in imitation eagle; do
        run stages_$1_${stage}_$3 $PY -m train.run --config configs/$1.py:$stage --compile-only $2 \
            --json $OUT/stages_$1_${stage}_$3.json
      done
    done
    ;;
  continuous)
    # Continuous batching's programs (prefill, insert, rounds) for 7B at 32 and 64 slots.
    run decode_slots_llava15_7b_v5e_2x2 $PY -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 \
        --mesh data=1,tensor=4 --batch-size 32 64 --draft-len 5 --max-new-tokens 64 \
        --acceptance benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json --no-generate \
        --batching continuous --json $OUT/decode_slots_llava15_7b_v5e_2x2.json
    # The prefill of 8 prompts (--prefill), what benchmarks/batching/tpu_predict.py scales to a
    # prefill of P or B prompts when it predicts continuous against static batching.
    run decode_prefill_llava15_7b_v5e_2x2 $PY -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 \
        --mesh data=1,tensor=4 --batch-size 8 --draft-len 5 --max-new-tokens 64 \
        --acceptance benchmarks/trees/demo_batch1_8_32_chain5_tree8x2_16x2_quiet.json --no-generate \
        --prefill --json $OUT/decode_prefill_llava15_7b_v5e_2x2.json
    ;;
  *) echo "usage: $0 train|train-stages|refine-stages|decode|decode-batches|drafters|trees|gemma3-decode|gemma3-train|qwen25vl-decode|qwen25vl-plan|qwen25vl-train|continuous|bytes|int8" >&2; exit 2 ;;
esac
