#!/usr/bin/env bash
# On the two-GPU machine (nvidia-h200-x2), from the project root (see benchmarks/README.md):
#   source .device/extra/activate.sh && ZMLX_GIT_COMMIT=<sha> bash benchmarks/gpu/run_distributed.sh STEP [TOKENS]
# Issue 21's GPU proof: zmlx's patterns on models mlx-lm splits over two GPUs, over MLX's NCCL
# backend (`mlx.launch --backend nccl -n 2`: two local ranks, one GPU each), into $OUT (or
# ./gpu-results): a log per step and the ledger lines.
#   STEP=tests     the tests in TESTS (default tests/distributed/test_sharded_nccl.py: tiny models
#                  split over the two GPUs; the ring tests run on the CPU in CI, and here they
#                  took the whole limit of the first run before reaching it), stopped after
#                  TEST_LIMIT seconds (default 540); one line per test reaches the log as it ends
#   STEP=validate  zmlx validate of MODEL split over the two GPUs (tensor parallel): the family's
#                  CUDA preset vs stock, both sharded; rank 0 prints the report
#   STEP=sharded   matrix run of MODEL split over the two GPUs: sharded stock vs sharded patched
#                  (the CUDA preset), RUNS alternated runs each (default 5); one ledger line
#   STEP=single    the same matrix run on one GPU (the line of the same commit beside it)
#   STEP=ledger    sharded, then single (each needs ~5 minutes on flash: one device command each
#                  where a command is limited to 600 s)
# MODEL (default synth:glm4_moe_lite/flash/affine4: its widths split over 2 into whole
# quantization groups of 64, zmlx.distributed.shard_reason), RUNS, PROMPT (prompt tokens,
# default 32), ACCURACY=1 (judge by the accuracy rule against a float32 reference; off by
# default: the CUDA preset is exact, so its verdict is identical tokens), DRY=1 (print the
# commands, run nothing). BACKEND=ring (RING_PORT: its first port) runs the same steps on the
# CPU over MLX's ring backend, with a tiny MODEL (tests/bench/test_run_distributed.py does).
# Bring the results home with:
#   python -m zmlx.matrix merge <files_at>/matrix.jsonl && cp <files_at>/run-*.log benchmarks/results/
set -euo pipefail

usage="usage: run_distributed.sh tests|validate|sharded|single|ledger [TOKENS]"
step=${1:-}
tokens=${2:-200}
runs=${RUNS:-5}
out=${OUT:-gpu-results}
model=${MODEL:-synth:glm4_moe_lite/flash/affine4}
prompt=${PROMPT:-32}
dry=${DRY:-0}
backend=${BACKEND:-nccl}

die() { echo "error: $*" >&2; exit 2; }
case "$step" in
  tests|validate|sharded|single|ledger) ;;
  "") die "no step given; $usage" ;;
  *) die "unknown step '$step'; $usage" ;;
esac
for pair in "TOKENS=$tokens" "RUNS=$runs" "PROMPT=$prompt" "TEST_LIMIT=${TEST_LIMIT:-540}" \
  "RING_PORT=${RING_PORT:-32323}"; do
  [[ ${pair#*=} =~ ^[1-9][0-9]*$ ]] || die "${pair%%=*} must be a positive integer, got '${pair#*=}'"
done
[[ $dry =~ ^[01]$ ]] || die "DRY must be 0 or 1, got '$dry'"
case "$backend" in
  nccl|ring) ;;
  *) die "BACKEND must be nccl or ring, got '$backend'" ;;
esac

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
device=${device:-unknown}
# the launcher's ranks each take one GPU (CUDA_VISIBLE_DEVICES=<rank>); a one-GPU step needs one
need=2
[ "$step" = single ] && need=1
[ "$backend" = ring ] && need=0
if [ "$dry" = 0 ] && [ "${gpus:-0}" -lt "$need" ]; then
  die "step $step needs $need GPUs, nvidia-smi lists ${gpus:-0}"
fi
if command -v mlx.launch >/dev/null; then
  launch=(mlx.launch)
else
  # what the mlx.launch script runs (the module has no __main__)
  launch=(python3 -c 'import sys; from mlx._distributed_utils.launch import main; sys.exit(main())')
fi
launch+=(--backend "$backend" -n 2)
[ "$backend" = ring ] && launch+=(--starting-port "${RING_PORT:-32323}")
launch+=(--)

mkdir -p "$out"
log="$out/run-distributed-$step-$tokens.log"
echo "== $(date -u +%FT%TZ) step=$step tokens=$tokens runs=$runs model=$model backend=$backend" \
  "device=${gpus:-0}x $device" | tee -a "$log"

run() {
  # the command, shell-quoted, then (unless DRY=1) its output; a failing command stops the script
  printf '+' | tee -a "$log"
  printf ' %q' "$@" | tee -a "$log"
  echo | tee -a "$log"
  [ "$dry" = 1 ] && return 0
  "$@" 2>&1 | tee -a "$log"
}

accuracy=--no-accuracy
[ "${ACCURACY:-0}" = 1 ] && accuracy=--accuracy

tests() {
  # pytest's output to a pipe is block-buffered: unbuffered and one line per test (-v), so
  # what ran before the limit reaches the log; the counts are taken from the log afterwards.
  local args
  read -ra args <<< "${TESTS:-tests/distributed/test_sharded_nccl.py}"
  run env PYTHONUNBUFFERED=1 timeout "${TEST_LIMIT:-540}" python3 -m pytest -v -p no:cacheprovider -rfs --failures-at-once \
    "${args[@]}" || echo "== pytest exited $? (124: cut by the limit)" | tee -a "$log"
  [ "$dry" = 1 ] && return 0
  echo "== passed $(grep -c ' PASSED' "$log" || true), failed $(grep -c ' FAILED' "$log" || true), skipped $(grep -c ' SKIPPED' "$log" || true) (this log)" | tee -a "$log"
}
validate() {
  run "${launch[@]}" python3 -m zmlx.validate "$model" --runs "$runs" --max-tokens "$tokens" "$accuracy"
}
matrix_cmd() {
  # the matrix run command into the array m; $1: the line's notes
  m=(python3 -m zmlx.matrix run "$model" --runs "$runs" --max-tokens "$tokens" --prompt-tokens "$prompt"
    "$accuracy" --ledger "$out/matrix.jsonl" --notes "$1")
}
sharded() {
  matrix_cmd "tensor parallel over 2 ranks ($backend): sharded stock vs sharded patched, the default preset, $device"
  run "${launch[@]}" "${m[@]}"
}
single() {
  matrix_cmd "one process, beside the 2-rank tensor-parallel line of this commit, $device"
  run "${m[@]}"
}
case "$step" in
  tests) tests ;;
  validate) validate ;;
  sharded) sharded ;;
  single) single ;;
  ledger) sharded; single ;;
esac
echo "== $(date -u +%FT%TZ) done" | tee -a "$log"
