#!/usr/bin/env bash
# Training speed and memory, side by side in one run: Python `mlx_lm lora`
# against `blossom-p2p bench train`, on the same machine, the same libmlx
# (the mlx-cpu 0.32.2 wheel, with OpenBLAS preloaded into Python as our binary
# links it), the same float32 model folder, the same LoRA settings and data.
#
#   MLX_LM_PYTHON=.venv-mlx/bin/python bash bench/compare_mlx_lm.sh [STEPS]
#   ONLY=" 8$" bash bench/compare_mlx_lm.sh 3     # only the cases that match
#   DTYPE=bfloat16 bash bench/compare_mlx_lm.sh    # bfloat16 weights on both sides
#
# Needs Python mlx-lm 0.32.2 ("pip install mlx-lm==0.32.2 'mlx[cpu]==0.32.2'";
# `PYTHONPATH=.deps/python python3` has it after `scripts/setup.sh --tests`).
#
# Cases: 512-token text rows (LoRA, DoRA; LoRA at batch 2 too, where ours
# computes the two rows at once on two CPU streams); short prompt/completion rows like
# the built-in task's (about 40 tokens) at batch 1 and 8; rows of mixed
# length (25 to 250 tokens) at batch 8, where padding costs the most. Ours
# runs padded and, where a batch has several rows, packed (train.pack).
# Each line prints real (non-padding) tokens/s of both, their ratio, and the
# share of the matmul limit ours reached (`bench train`'s "compute" line).
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

# The same settings on both sides: 16 layers, rank 8, every projection, no dropout.
RANK=8; LAYERS=16; SCALE=20.0
"$BIN" -q export --dequantize --out "$WORK/model" >/dev/null
# DTYPE=bfloat16: both sides train and generate on a bfloat16 copy of the
# weights (the adapters stay float32 on both), a GPU's fast path.
DTYPE="${DTYPE:-float32}"
case "$DTYPE" in
  float32) ;;
  bfloat16) "$PY" - "$WORK/model" <<'PYEOF'
import glob, sys
import mlx.core as mx
for path in glob.glob(sys.argv[1] + "/*.safetensors"):
    weights = mx.load(path)
    mx.save_safetensors(path, {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in weights.items()})
PYEOF
  ;;
  *) echo "DTYPE must be float32 or bfloat16, not $DTYPE" >&2; exit 2 ;;
esac
"$PY" - "$WORK" <<'PYEOF'
import json, random, sys
work = sys.argv[1]
text = "The river carried the small boat past fields of wheat and old stone houses, while the sun rose over the hills. "
words = ["apple", "river", "stone", "cloud", "tiger", "paper", "green", "music", "house", "bread", "light", "chair"]
rng = random.Random(0)
def write(name, rows):
    import os
    os.makedirs(f"{work}/{name}", exist_ok=True)
    # mlx_lm evaluates at least one batch, so the valid split holds 8 rows.
    for split, part in (("train", rows[8:]), ("valid", rows[:8])):
        with open(f"{work}/{name}/{split}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
# Long rows, truncated to 512 tokens.
write("long", [{"text": f"{i}. " + text * 30} for i in range(72)])
# Short rows shaped like the built-in task's: reverse three to eight words.
def short(i):
    picked = rng.sample(words, rng.randint(3, 8))
    return {"prompt": "Reverse the order of these words: " + " ".join(picked), "completion": " ".join(reversed(picked))}
write("short", [short(i) for i in range(264)])
# Mixed lengths: 1 to 10 copies of the sentence (about 25 to 250 tokens).
write("mixed", [{"text": f"{i}. " + text * rng.randint(1, 10)} for i in range(136)])
PYEOF
for type in lora dora; do
  printf 'lora_parameters:\n  rank: %s\n  scale: %s\n  dropout: 0.0\n' "$RANK" "$SCALE" > "$WORK/$type.yaml"
done

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

# mlx_lm DATA TYPE BATCH SEQ: prints "tokens/s peak_GB" of the second STEPS steps.
mlx_lm() {
  local log="$WORK/mlx-$1-$2-$3.log"
  LD_PRELOAD="$OPENBLAS" "$PY" "$WORK/run_mlx_lm.py" --model "$WORK/model" --train --data "$WORK/$1" \
    --fine-tune-type "$2" --num-layers $LAYERS --batch-size "$3" --max-seq-length "$4" \
    --iters $((2 * STEPS)) --steps-per-report "$STEPS" --steps-per-eval 100000 --val-batches 1 \
    --adapter-path "$WORK/mlx-adapters" -c "$WORK/$2.yaml" > "$log" 2>&1 || { tail -5 "$log" >&2; echo "? ?"; return; }
  grep "^REPORT " "$log" | tail -n1 | cut -d' ' -f2- \
    | "$PY" -c "import json,sys; r=json.load(sys.stdin); print(round(r['tokens_per_second'], 1), r['peak_memory'])"
}

# ours DATA TYPE BATCH SEQ PACK: prints "tokens/s peak_MB compute_share".
ours() {
  local log="$WORK/ours-$1-$2-$3-$5.log"
  "$BIN" -q --set lora.fine_tune_type="$2" --set lora.num_layers=$LAYERS --set lora.rank=$RANK \
    --set lora.scale=$SCALE --set lora.dropout=0 --set train.batch_size="$3" --set train.max_seq_length="$4" \
    --set train.pack="$5" bench train --model "$WORK/model" --data "$WORK/$1" --steps "$STEPS" --quant keep > "$log" 2>&1 \
    || { tail -5 "$log" >&2; echo "? ? ?"; return; }
  echo "$(grep -oE "^train tok/s: [0-9.]+" "$log" | awk '{print $3}') \
$(grep -oE "^peak memory: [0-9.]+" "$log" | awk '{print $3}') \
$(grep -oE "[0-9]+% of the [0-9.]+ GFLOP/s matmul limit" "$log" | awk '{print $1}')"
}

ratio() { "$PY" -c "import sys; a, b = sys.argv[1:]; print(f'{float(a) / float(b):.2f}x' if '?' not in a + b else '?')" "$1" "$2"; }

echo "| rows | method | batch | mlx_lm tok/s | ours padded tok/s | ratio | ours packed tok/s | ratio | ours' share of the matmul limit | peak memory ours / mlx_lm |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
case_line() {  # DATA TYPE BATCH SEQ LABEL; ONLY="short lora 8" runs the cases it matches
  [[ "$1 $2 $3" =~ ${ONLY:-.} ]] || return 0
  read -r theirs their_gb < <(mlx_lm "$1" "$2" "$3" "$4")
  read -r padded padded_mb share < <(ours "$1" "$2" "$3" "$4" false)
  local packed="-" packed_ratio="-"
  if [ "$3" -gt 1 ]; then
    read -r packed _ packed_share < <(ours "$1" "$2" "$3" "$4" true)
    packed_ratio=$(ratio "$packed" "$theirs"); share="$share (packed $packed_share)"
  fi
  local memory="?"
  [ "$padded_mb" != "?" ] && [ "$their_gb" != "?" ] && memory=$("$PY" -c "print(f'{$padded_mb / 1000 / $their_gb:.2f}x')")
  echo "| $5 | $2 | $3 | $theirs | $padded | $(ratio "$padded" "$theirs") | $packed | $packed_ratio | $share | $memory |"
}
case_line long lora 1 512 "512 tokens"
case_line long dora 1 512 "512 tokens"
case_line long lora 2 512 "512 tokens"
case_line short lora 1 512 "short (~40 tokens)"
case_line short dora 1 512 "short (~40 tokens)"
case_line short lora 8 512 "short (~40 tokens)"
case_line mixed lora 8 512 "mixed (25-250 tokens)"
echo "($STEPS timed steps each, $DTYPE weights; share of the matmul limit: tokens/s x FLOPs a token over a float32 matmul's rate, 1024^3 on a CPU and 8192^3 on a GPU, measured in the same run)"

# Generation: the same model, a 128-token prompt (the same sentence
# cycled), 64 new tokens, greedy. mlx_lm prints its own prompt and generation
# rates; ours is `bench generate`'s median of three runs.
[[ "generate" =~ ${ONLY:-.} ]] || exit 0
PROMPT="$("$PY" -c "print('The quick brown fox jumps over the lazy dog while the sun sets over the hills. ' * 8)")"
theirs_log="$WORK/mlx-generate.log"
# Twice, keeping the second: the first run of a shape compiles its kernels
# (on CUDA they are then cached on disk), which ours leaves to a warm-up.
for _ in 1 2; do
  LD_PRELOAD="$OPENBLAS" "$PY" -m mlx_lm generate --model "$WORK/model" --prompt "$PROMPT" --ignore-chat-template \
    --max-tokens 64 --temp 0 > "$theirs_log" 2>&1 || tail -5 "$theirs_log" >&2
done
their_prompt=$(grep -oE "^Prompt: [0-9]+ tokens, [0-9.]+" "$theirs_log" | awk '{print $4}')
their_gen=$(grep -oE "^Generation: [0-9]+ tokens, [0-9.]+" "$theirs_log" | awk '{print $4}')
ours_log="$WORK/ours-generate.log"
"$BIN" -q bench generate --model "$WORK/model" --prompt-tokens 128 --max-tokens 64 > "$ours_log" 2>&1 || tail -5 "$ours_log" >&2
# A float32 folder gives only the float32 row; a bfloat16 one is measured "as stored".
row=$([ "$DTYPE" = float32 ] && echo "^float32" || echo "^as stored")
read -r our_prompt our_gen < <(grep "$row" "$ours_log" | awk '{print $(NF-2), $(NF-1)}')
echo
echo "| generate ($DTYPE, 128-token prompt, 64 tokens) | mlx_lm tok/s | ours tok/s | ratio |"
echo "| --- | --- | --- | --- |"
echo "| prompt | ${their_prompt:-?} | ${our_prompt:-?} | $(ratio "${our_prompt:-?}" "${their_prompt:-?}") |"
echo "| generation | ${their_gen:-?} | ${our_gen:-?} | $(ratio "${our_gen:-?}" "${their_gen:-?}") |"
