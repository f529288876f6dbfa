#!/usr/bin/env bash
# Checks that `blossom-p2p export` writes a folder that Python mlx-lm loads,
# and that mlx-lm's greedy answer equals ours, for the default model, without
# and with an adapter trained by `blossom-p2p train`.
# Uses the mlx-lm that `bash scripts/setup.sh --tests` installs into
# .deps/python (mlx-lm 0.32.2 with mlx[cpu] 0.32.2, the wheel we link), or the
# Python named by MLX_LM_PYTHON. Without mlx-lm it skips (exit 0), except in
# CI (CI set), where that is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${MLX_LM_PYTHON:-python3}"
if [ -z "${MLX_LM_PYTHON:-}" ] && [ -d .deps/python/mlx_lm ]; then
  export PYTHONPATH="$PWD/.deps/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import mlx_lm" >/dev/null 2>&1; then
  if [ -n "${CI:-}" ]; then
    echo "FAIL: Python mlx-lm is not installed for $PY; CI must have it (bash scripts/setup.sh --tests installs it)"
    exit 1
  fi
  echo "SKIP: Python mlx-lm is not installed for $PY (bash scripts/setup.sh --tests installs it into .deps/python)"
  exit 0
fi
BIN="${BLOSSOM_BIN:-target/debug/blossom-p2p}"
[ -x "$BIN" ] || cargo build --quiet
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$BIN" -q export --out "$OUT/model" >/dev/null
status=0
# Compares our greedy answer with mlx-lm's; args: label, question, extra flags for both.
compare() {
  local label="$1" question="$2"
  shift 2
  local ours theirs
  ours="$("$BIN" -q generate --model "$OUT/model" "$@" --prompt "$question" --max-tokens 24)"
  theirs="$("$PY" -m mlx_lm generate --model "$OUT/model" "$@" --prompt "$question" --max-tokens 24 2>/dev/null \
    | awk '/^==========$/ { inside = !inside; next } inside')"
  if [ "$ours" = "$theirs" ]; then
    echo "same answer$label: $question -> $ours"
  else
    echo "DIFFERENT$label: $question"; echo "  blossom-p2p: $ours"; echo "  mlx-lm:      $theirs"
    status=1
  fi
}
compare "" "What is the capital of France?"
compare "" "How many days are in a week?"
# An adapter trained here must give mlx-lm the same greedy answer as ours.
"$BIN" -q train --iters 20 --exact-match-rows 0 --val-rows 4 --steps-per-eval 20 --adapter-path "$OUT/adapter" >/dev/null
compare " with the adapter" "Reverse the order of these words: apple river stone" --adapter-path "$OUT/adapter"
exit $status
