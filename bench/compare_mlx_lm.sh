#!/usr/bin/env bash
# Training speed and memory, side by side in one run: Python `mlx_lm lora`
# against `blossom-p2p bench train`, on the same machine, the same libmlx
# (the mlx-cpu 0.32.2 wheel, with OpenBLAS preloaded into Python as our binary
# links it), the same float32 model folder, the same LoRA settings and data.
#
#   MLX_LM_PYTHON=.venv-mlx/bin/python bash bench/compare_mlx_lm.sh [STEPS]
#
# Needs Python mlx-lm 0.32.2 ("pip install mlx-lm==0.32.2 'mlx[cpu]==0.32.2'").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${MLX_LM_PYTHON:-python3}"
STEPS="${1:-10}"
if ! "$PY" -c "import mlx_lm" >/dev/null 2>&1; then
  echo "SKIP: Python mlx-lm is not installed for $PY (set MLX_LM_PYTHON)"; exit 0
fi
BIN="${BLOSSOM_BIN:-target/debug/blossom-p2p}"
[ -x "$BIN" ] || cargo build --quiet
OPENBLAS="$(ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 2>/dev/null | head -n1 || true)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
set +o pipefail  # a missing figure is reported below, not fatal

# The same settings on both sides: LoRA, 16 layers, rank 8, every projection,
# batch 1, sequences of 512 tokens, no dropout.
RANK=8; LAYERS=16; SCALE=20.0; SEQ=512
"$BIN" -q export --dequantize --out "$WORK/model" >/dev/null
mkdir -p "$WORK/data"
"$PY" - "$WORK/data" <<'PYEOF'
import json, sys
text = "The river carried the small boat past fields of wheat and old stone houses, while the sun rose over the hills. "
for split, n in (("train", 64), ("valid", 4)):
    with open(f"{sys.argv[1]}/{split}.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i}. " + text * 30}) + "\n")
PYEOF
cat > "$WORK/lora.yaml" <<YAML
lora_parameters:
  rank: $RANK
  scale: $SCALE
  dropout: 0.0
YAML

echo "== mlx_lm lora ($STEPS steps after $STEPS warm-up) =="
# mlx_lm's own CLI, with its report callback swapped for one that prints the
# figures as JSON (tokens_per_second, peak_memory in GB).
cat > "$WORK/run_mlx_lm.py" <<'PYEOF'
import json, sys
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT " + json.dumps({k: float(v) for k, v in info.items() if isinstance(v, (int, float))}), flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: Report()
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
lora.main()
PYEOF
LD_PRELOAD="$OPENBLAS" "$PY" "$WORK/run_mlx_lm.py" --model "$WORK/model" --train --data "$WORK/data" \
  --fine-tune-type lora --num-layers $LAYERS --batch-size 1 --max-seq-length $SEQ \
  --iters $((2 * STEPS)) --steps-per-report $STEPS --steps-per-eval 100000 --val-batches 1 \
  --adapter-path "$WORK/mlx-adapters" -c "$WORK/lora.yaml" > "$WORK/mlx.log" 2>&1 || { tail -5 "$WORK/mlx.log"; exit 1; }
REPORT=$(grep "^REPORT " "$WORK/mlx.log" | tail -n1 | cut -d' ' -f2-)
echo "$REPORT"
THEIRS=$("$PY" -c "import json,sys; print(json.loads(sys.argv[1])['tokens_per_second'])" "$REPORT")
THEIR_MEM=$("$PY" -c "import json,sys; print(json.loads(sys.argv[1])['peak_memory'])" "$REPORT")

echo "== blossom-p2p bench train =="
"$BIN" -q --set lora.fine_tune_type=lora --set lora.num_layers=$LAYERS --set lora.rank=$RANK \
  --set lora.scale=$SCALE --set lora.dropout=0 --set train.batch_size=1 --set train.max_seq_length=$SEQ \
  bench train --model "$WORK/model" --data "$WORK/data" --steps "$STEPS" --quant keep | tee "$WORK/ours.log"
OURS=$(grep -oE "^train tok/s: [0-9.]+" "$WORK/ours.log" | awk '{print $3}')
OUR_MEM=$(grep -oE "^peak memory: [0-9.]+" "$WORK/ours.log" | awk '{print $3}')

echo "== comparison =="
echo "mlx_lm lora: ${THEIRS:-?} tokens/s, peak ${THEIR_MEM:-?} GB"
echo "blossom-p2p: ${OURS:-?} tokens/s, peak ${OUR_MEM:-?} MB"
if [ -n "${THEIRS:-}" ] && [ -n "${OURS:-}" ]; then
  "$PY" -c "print(f'ratio (ours / mlx_lm): {float(\"$OURS\") / float(\"$THEIRS\"):.2f}x tokens/s, {float(\"$OUR_MEM\") / 1000 / float(\"$THEIR_MEM\"):.2f}x peak memory')"
fi
