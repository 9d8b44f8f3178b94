#!/usr/bin/env bash
# The GPU table of benchmarks/RESULTS.md in one go, on one machine: versions, the 1.33B model of issue #10 in every
# row, the 8B-shaped layers packed (MFU), a run without gradient checkpointing, and the demo end to end.
# Logs and JSON go to $OUT (default benchmarks/gpu-out). Each part has its own time limit, so one slow part
# does not cost the others.
set -uo pipefail
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=benchmarks/bench_train_throughput.py
LAYER8B=(--device cuda --hidden 4096 --intermediate 14336 --layers 4 --heads 32 --kv-heads 8 --vocab 128256
         --seq 2048 --micro-batch 16 --packing)

python3 - <<'PY' | tee "$OUT/versions.txt"
import deepspeed, peft, torch, transformers
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
timeout 200 python3 $B --device cuda --hidden 2048 --layers 16 --vocab 128256 --seq 2048 --micro-batch 16 \
    --json "$OUT/model1b.json" > "$OUT/model1b.log" 2>&1; echo "exit $?"; tail -9 "$OUT/model1b.log"
timeout 100 python3 $B "${LAYER8B[@]}" --rows plain,replicate --json "$OUT/layer8b.json" > "$OUT/layer8b.log" 2>&1
echo "exit $?"; tail -4 "$OUT/layer8b.log"
timeout 50 python3 $B "${LAYER8B[@]}" --rows replicate --no-checkpointing > "$OUT/layer8b_nockpt.log" 2>&1
echo "exit $?"; tail -3 "$OUT/layer8b_nockpt.log"
timeout 100 python3 -m gift_dist.cli demo --output /tmp/gift-demo > "$OUT/demo.log" 2>&1; echo "exit $?"
grep -E "layout|error|Error" "$OUT/demo.log" | head -5; tail -12 "$OUT/demo.log"
