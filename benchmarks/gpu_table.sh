#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go, on one machine: versions; the 1.33B model of issue #10 padded
# (every row fed the same padded micro-batches) and packed (what `gift-dist train` does on a GPU), each row
# profiled (GPU busy time, synchronising call sites); the 8B-shaped layers packed, with and without gradient
# checkpointing, with and without Liger's kernels (MFU). Everything goes to $OUT (default benchmarks/gpu-out):
# table.log, the rows as JSON, prof*/profile-<row>.txt. Each part has its own time limit.
# SMOKE=1 runs the same parts at a tiny size on the CPU (to check the script before spending GPU time).
set -uo pipefail
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=benchmarks/bench_train_throughput.py
WORK=${WORK:-/tmp/gift_bench}
if [[ ${SMOKE:-0} == 1 ]]; then
    MODEL1B=(--device cpu --hidden 64 --layers 2 --vocab 512 --seq 64 --micro-batch 4)
    LAYER8B=(--device cpu --hidden 128 --layers 2 --heads 4 --kv-heads 2 --vocab 512 --seq 64 --micro-batch 4 --packing)
    LIGER=()
    BUDGET=400
else
    export DS_ACCELERATOR=cuda
    MODEL1B=(--device cuda --hidden 2048 --layers 16 --vocab 128256 --seq 2048 --micro-batch 16)
    LAYER8B=(--device cuda --hidden 4096 --intermediate 14336 --layers 4 --heads 32 --kv-heads 8 --vocab 128256
             --seq 2048 --micro-batch 16 --packing)
    LIGER=(--liger)
    BUDGET=8192
fi
STEPS=(--warmup 2 --steps 5)
LOG="$OUT/table.log"

python3 - <<'PY' | tee "$LOG"
import deepspeed, peft, torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"{name}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
PARTS=${PARTS:-padded,packed,budget,zero3,layer8b,liger}  # a subset to rerun only those
part() {  # part KEY SECONDS TITLE COMMAND...: run with a limit, keep the table lines
    local key=$1 limit=$2 title=$3; shift 3
    [[ ",$PARTS," == *",$key,"* ]] || return 0
    echo "== $title" | tee -a "$LOG"
    timeout "$limit" "$@" > "$OUT/part.log" 2>&1; local code=$?
    grep -vE "Warning|warn|^\s*$|it/s\]|examples/s\]" "$OUT/part.log" | tail -12 | tee -a "$LOG"
    echo "exit $code" | tee -a "$LOG"
}
part padded 170 "1.33B, padded" python3 $B "${MODEL1B[@]}" "${STEPS[@]}" --rows plain,replicate,hf_replicate \
    --root "$WORK/m1b" --profile "$OUT/prof1b" --json "$OUT/model1b.json"
part packed 120 "1.33B, packed (varlen attention where available)" python3 $B "${MODEL1B[@]}" "${STEPS[@]}" --packing \
    --rows plain,replicate,hf_replicate --root "$WORK/m1b" --profile "$OUT/prof1b_packed" \
    --json "$OUT/model1b_packed.json"
part budget 150 "1.33B, packed, micro-batches of up to 8192 tokens, recompute as auto decides" python3 $B \
    "${MODEL1B[@]}" "${STEPS[@]}" --packing --micro-batch-tokens "$BUDGET" --checkpointing auto \
    --rows plain,replicate,hf_replicate --root "$WORK/m1b_budget" --json "$OUT/model1b_budget_auto.json"
part budget 80 "1.33B, packed, micro-batches of up to 8192 tokens, recompute on" python3 $B "${MODEL1B[@]}" \
    "${STEPS[@]}" --packing --micro-batch-tokens "$BUDGET" --checkpointing true --rows replicate,hf_replicate \
    --root "$WORK/m1b_budget" --json "$OUT/model1b_budget_recompute.json"
part zero3 150 "1.33B, padded, forced zero3 against the plain loop (target >= 0.7x)" python3 $B "${MODEL1B[@]}" \
    "${STEPS[@]}" --rows plain,zero3 --root "$WORK/m1b" --json "$OUT/model1b_zero3.json"
part layer8b 80 "8B-shaped layers, packed, gradient checkpointing" python3 $B "${LAYER8B[@]}" "${STEPS[@]}" \
    --rows replicate --root "$WORK/l8b" --json "$OUT/layer8b.json"
part layer8b 60 "8B-shaped layers, packed, no gradient checkpointing" python3 $B "${LAYER8B[@]}" "${STEPS[@]}" \
    --rows replicate --checkpointing false --root "$WORK/l8b" --profile "$OUT/prof8b" --json "$OUT/layer8b_nockpt.json"
# Liger against the same rows without it, after 6 warm-up steps (Triton compiles for the first row lengths).
for liger in "" "${LIGER[@]}"; do
  part liger 90 "8B-shaped layers, packed, no gradient checkpointing, ${liger:-no Liger}" python3 $B "${LAYER8B[@]}" \
      --warmup 6 --steps 5 --rows replicate --checkpointing false ${liger:+"$liger"} --root "$WORK/l8b_w6" \
      --json "$OUT/layer8b_nockpt${liger:+_liger}_w6.json"
  part liger 90 "1.33B, packed, ${liger:-no Liger}" python3 $B "${MODEL1B[@]}" --warmup 6 --steps 5 --packing \
      ${liger:+"$liger"} --rows replicate --root "$WORK/m1b_w6" --json "$OUT/model1b_packed${liger:+_liger}_w6.json"
done
rm -f "$OUT/part.log"
