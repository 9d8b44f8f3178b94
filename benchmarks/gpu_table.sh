#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go, on one machine: versions, the varlen-attention kernel check,
# the 1.33B model of issue #10 (padded, every row), the 8B-shaped layers packed (MFU; varlen vs sdpa attention;
# without gradient checkpointing), profiles of the plain and engine steps. Everything goes to $OUT (default
# benchmarks/gpu-out): table.log, the rows as JSON, prof*/profile-<row>.txt. Each part has its own time limit.
set -uo pipefail
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=benchmarks/bench_train_throughput.py
MODEL1B=(--device cuda --hidden 2048 --layers 16 --vocab 128256 --seq 2048 --micro-batch 16)
LAYER8B=(--device cuda --hidden 4096 --intermediate 14336 --layers 4 --heads 32 --kv-heads 8 --vocab 128256
         --seq 2048 --micro-batch 16 --packing)
ROWS1B=${ROWS1B:-plain,replicate,zero3,hf_replicate,hf_zero3}
LOG="$OUT/table.log"

python3 - <<'PY' | tee "$LOG"
import deepspeed, peft, torch, transformers
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
part() {  # part SECONDS TITLE COMMAND...: run with a limit, keep the table lines
    local limit=$1 title=$2; shift 2
    echo "== $title" | tee -a "$LOG"
    timeout "$limit" "$@" > "$OUT/part.log" 2>&1; local code=$?
    grep -vE "Warning|warn|^\s*$|it/s\]|examples/s\]" "$OUT/part.log" | tail -12 | tee -a "$LOG"
    echo "exit $code" | tee -a "$LOG"
}
part 60 "varlen kernel vs per-sample reference" python3 -m pytest -q -p no:cacheprovider tests/test_attention.py
part 200 "1.33B, padded" python3 $B "${MODEL1B[@]}" --rows "$ROWS1B" --profile "$OUT/prof1b" --json "$OUT/model1b.json"
part 100 "8B-shaped layers, packed, attention auto" python3 $B "${LAYER8B[@]}" --rows plain,replicate \
    --profile "$OUT/prof8b" --json "$OUT/layer8b.json"
part 50 "8B-shaped layers, packed, sdpa" python3 $B "${LAYER8B[@]}" --rows replicate --attn sdpa
part 50 "8B-shaped layers, packed, no gradient checkpointing" python3 $B "${LAYER8B[@]}" --rows replicate \
    --no-checkpointing
rm -f "$OUT/part.log"
