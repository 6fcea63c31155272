#!/usr/bin/env bash
# On the GPU machine, from the project root (see benchmarks/README.md):
#   source .device/extra/activate.sh && ZMLX_GIT_COMMIT=<sha> bash benchmarks/gpu/run_glm47_flash.sh STEP TOKENS
# Builds the full-size synthetic GLM-4.7-Flash in memory (affine 4-bit, group 64, bf16
# scales: the same generator and conversion as `python -m zmlx.synth --preset flash`)
# and leaves capsules, the ledger lines and a log in $OUT (or ./gpu-results):
#   STEP=experiments  the experiment script over the variants in $VARIANTS
#   STEP=noise        matrix run, stock vs stock (the noise floor)
#   STEP=preset       matrix run, the family's default preset vs stock (MODEL: any synth
#                     spec, e.g. synth:qwen3_moe/30b_a3b/affine4; PROMPT, ACCURACY, KERNELS
#                     and ISSUE as for ledger)
#   STEP=ledger       matrix run, each pattern alone and the preset, vs one shared control
#                     (one ledger line each; PATTERN_SETS overrides the sets, ';'-separated;
#                     PROMPT=4096 decodes after a 4096-token prompt; ACCURACY=0 skips the
#                     float32 reference: a set whose tokens differ is then FAIL, which is the
#                     verdict for an exact pattern anyway, and it saves ~100 s a set on flash;
#                     KERNELS=0 and ISSUE=0 leave out the kernel count and the issue time,
#                     each noted in the line: at a 32768-token prompt their prefills do not
#                     fit a 10-minute command beside the runs; PREFILL_ONCE=1 prefills the
#                     prompt once per set and starts each run from it: a 32768-token prompt's
#                     ~30 s prefill is then paid once, not once a run)
#   STEP=kernels      the `cuda` kernel tests (KERNEL_TESTS: which files), then the per-kernel
#                     micro-benchmark
#   STEP=tests        the `cuda` tests in TESTS (pytest arguments: files, -k ...), stopped after
#                     TEST_LIMIT seconds (default 540); one line per test goes to the log as it
#                     ends (unbuffered), and a failure's traceback at once, so a run cut by the
#                     limit still says what passed and why what failed did; WORKERS=N runs
#                     them in N processes on the one GPU (pytest-xdist: NVRTC and MLX's JIT
#                     compile new shapes on the CPU cores in parallel)
#   STEP=all          experiments, noise and preset in turn
# Bring the results home with:
#   cp <files_at>/*.json repro_capsules/ && python -m zmlx.matrix merge <files_at>/matrix.jsonl
set -euo pipefail
step=${1:?STEP: experiments|noise|preset|ledger|kernels|tests|all}
tokens=${2:-200}
if [ "$step" = tests ] && [ -z "${TESTS:-}" ]; then
  echo "error: STEP=tests needs TESTS (the pytest arguments, e.g. TESTS=tests/patch/test_moe_block.py)" >&2
  exit 2
fi
if [ -n "${WORKERS:-}" ] && ! [[ $WORKERS =~ ^[1-9][0-9]*$ ]]; then
  echo "error: WORKERS must be a positive integer, got '$WORKERS'" >&2
  exit 2
fi
runs=${RUNS:-3}
out=${OUT:-gpu-results}
model=${MODEL:-synth:glm4_moe_lite/flash/affine4}
prompt=${PROMPT:-32}  # prompt tokens (the context decode starts from)
variants=${VARIANTS:-control control_repeat moe_router moe_combine residual_norm exact_three}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
mkdir -p "$out"
log="$out/run-$step-$tokens.log"
echo "== $(date -u +%FT%TZ) step=$step tokens=$tokens runs=$runs model=$model device=$device" | tee -a "$log"

experiments() {
  local args=()
  for v in $variants; do args+=(--variants "$v"); done
  python3 benchmarks/bench_glm47_flash_experiments.py --model "$model" "${args[@]}" --runs "$runs" \
    --max-tokens "$tokens" --capsule-dir "$out" 2>&1 | tee -a "$log"
}
noise() {
  python3 -m zmlx.matrix run "$model" --patterns none --runs "$runs" --max-tokens "$tokens" \
    --ledger "$out/matrix.jsonl" --notes "noise floor: stock vs stock, $device" 2>&1 | tee -a "$log"
}
options() {  # ACCURACY, KERNELS and ISSUE as matrix run's flags
  local flags=""
  [ "${ACCURACY:-1}" = 0 ] && flags="--no-accuracy"
  [ "${KERNELS:-1}" = 0 ] && flags="$flags --no-count-kernels"
  [ "${ISSUE:-1}" = 0 ] && flags="$flags --no-issue-time"
  [ "${PREFILL_ONCE:-0}" = 1 ] && flags="$flags --prefill-once"
  echo "$flags"
}
preset() {
  # shellcheck disable=SC2046
  python3 -m zmlx.matrix run "$model" --runs "$runs" --max-tokens "$tokens" --prompt-tokens "$prompt" $(options) \
    --ledger "$out/matrix.jsonl" --notes "${NOTES:-the default preset of the family vs stock}, $device" 2>&1 | tee -a "$log"
}
ledger() {
  local sets=${PATTERN_SETS:-moe_router;moe_combine;residual_norm;moe_router,moe_combine,residual_norm}
  local args=() accuracy
  accuracy=$(options)
  IFS=';' read -ra parts <<< "$sets"
  for s in "${parts[@]}"; do args+=(--patterns "$s"); done
  python3 -m zmlx.matrix run "$model" "${args[@]}" --runs "$runs" --max-tokens "$tokens" \
    --prompt-tokens "$prompt" $accuracy \
    --ledger "$out/matrix.jsonl" --notes "${NOTES:-each pattern alone and the preset}, $device" 2>&1 | tee -a "$log"
}
cuda_tests() {
  # pytest's output to a pipe is block-buffered: unbuffered and one line per test (-v), so
  # what ran before a timeout reaches the log; the counts are taken from the log afterwards.
  local limit=$1; shift
  local workers=()
  if [ -n "${WORKERS:-}" ]; then workers=(-n "$WORKERS"); fi
  # shellcheck disable=SC2068
  PYTHONUNBUFFERED=1 timeout "$limit" python3 -m pytest -v -p no:cacheprovider -m cuda -rf --failures-at-once \
    ${workers[@]+"${workers[@]}"} "$@" \
    >> "$log" 2>&1 || echo "== pytest exited $? (124: cut by the ${limit} s limit)" | tee -a "$log"
  echo "== passed $(grep -c ' PASSED' "$log" || true), failed $(grep -c ' FAILED' "$log" || true), skipped $(grep -c ' SKIPPED' "$log" || true) (this log)" | tee -a "$log"
  grep ' FAILED' "$log" | head -20 || true
}
tests() {
  # shellcheck disable=SC2086
  cuda_tests "${TEST_LIMIT:-540}" $TESTS
}
kernels() {
  # KERNEL_TESTS narrows the tests (e.g. "tests/kernels/test_moe_mlp.py tests/kernels/test_swiglu_mlp.py")
  # shellcheck disable=SC2086
  cuda_tests "${TEST_LIMIT:-540}" ${KERNEL_TESTS:-tests/kernels}
  # ONLY="glm47_rope mla_attention" narrows the micro-benchmark (and skips the overhead diagnostic)
  local only=()
  for k in ${ONLY:-}; do only+=(--only "$k"); done
  [ ${#only[@]} -gt 0 ] && only+=(--no-overhead)
  python3 benchmarks/bench_kernels.py --capsule-dir "$out" "${only[@]}" 2>&1 | tee -a "$log"
}
case "$step" in
  experiments) experiments ;;
  noise) noise ;;
  preset) preset ;;
  ledger) ledger ;;
  kernels) kernels ;;
  tests) tests ;;
  all) experiments; noise; preset ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
echo "== $(date -u +%FT%TZ) done" | tee -a "$log"
