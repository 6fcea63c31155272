#!/usr/bin/env bash
# On the GPU machine, from the project root (after `source benchmarks/gpu/env.sh`):
#   bash benchmarks/gpu/switch_checks.sh [NAME ...]
# NAME: mxfp4-fp-order, qmm-order, softmax-layers, gqa-prologue, oai-down, moe-block-compiled,
# mixtral-blocks, router-bias
# (default: all of them, in that order).
# The checks of the switches built off until they ran on a GPU (each turned on once they passed):
#   quant.MXFP4_FP_ORDER   the cuda tests of wide gathered mxfp4 rows in fp_qmv's order (on
#                          since they passed on the H200, 2026-12-01)
#   quant.QMM_ORDER        the cuda tests of the kernels in qmm_sm80's order (the tests turn
#                          it on themselves): moe_mlp and downproj_combine's QMM variants,
#                          mla_q_prep_embed, and mla_prologue with it on a model whose latent
#                          is wider than 128 (test_mla_prologue_embed.py); on since they
#                          passed on the H200, 2026-12-01. The tests turn on too
#                          quant.QMM_PIPELINED (moe_mlp's variant loaded a chunk ahead) and
#                          quant.QMM_DOWN (downproj_combine's, a block of k warps): both off
#                          until these tests pass with them and bench_kernels' qmm cases
#                          (`--only moe_mlp --only downproj_combine`) say they are no slower;
#                          and quant.QMM_BLOCK (moe_block's moe_gate_up(_route) and moe_down in
#                          that order at top-8 decode: tests/kernels/test_moe_block_qmm.py), off
#                          until these tests pass with it
#   moe_block.SOFTMAX_LAYERS   moe_block on the softmax-routed MoE layers (Qwen3-MoE's):
#                          tests/patch/test_moe_block_softmax.py turns it on itself (its
#                          cuda tests: the layers' launches, and the family's CUDA preset with
#                          them, bitwise stock); on since they passed on the H200, 2026-12-02
#   gqa_prologue in glm4_moe's and gpt_oss's CUDA presets   tests/patch/test_gqa_prologue.py's
#                          cuda tests (GLM-4.5-Air's attention widths, gpt-oss's sinks and
#                          sliding windows; Qwen3's and its family preset) and qk_norm_rope's
#                          (biases, no norms, partial and YaRN ropes): gqa_prologue joins those
#                          presets (families.py) once they pass (on since they passed on the
#                          H200, 2026-12-02)
#   softmax_layer.OAI_DOWN gpt-oss's down half (the experts' biases, the weighted sum, the
#                          residual add) in moe_down: tests/kernels/test_moe_down_bias.py's
#                          cuda tests (bitwise mlx-lm's SwitchLinear with its bias, gpt-oss-20b's
#                          widths) and test_moe_block_softmax.py's (the layers' four kernels and
#                          the family preset with them, bitwise stock); on since they passed
#                          on the H200, 2026-12-02
#   moe_block.COMPILED, gqa_prologue.COMPILED, mla_prologue.COMPILED   their prepared blocks
#                          called through mx.compile:
#                          tests/patch/test_moe_block_compiled.py's cuda tests (each family's
#                          CUDA preset with them bitwise stock); then
#                          `profile_host.py MODEL --sets PRESET --ab moe_compiled 3` for the host
#                          (all three on since both passed on the H200, 2026-12-02)
#   moe_block and gqa_prologue in mixtral's CUDA preset   their Mixtral cuda tests
#                          (test_moe_block_softmax.py, test_gqa_prologue.py: the layers' launches
#                          are the kernels, bitwise mlx-lm, and the preset with them bitwise
#                          stock): both join the preset (families.py, cuda_extra) once they pass
#   softmax_layer.ROUTER_BIAS   gpt-oss's quantized router's bias added in softmax_router: the
#                          kernel's bias cases (test_softmax_router.py) and the layers' check
#                          (test_moe_block_softmax.py), bitwise stock; on once they pass
# Each step's log goes to a new folder $OUT/switch-checks-<time> ($OUT: ./gpu-results by
# default; nothing there is overwritten); a summary line per switch is printed last.
# A switch is turned on (or back off) by editing its constant (never by this script).
set -uo pipefail
wanted=("$@")
for name in "${wanted[@]}"; do
  case "$name" in
    mxfp4-fp-order|qmm-order|softmax-layers|gqa-prologue|oai-down|moe-block-compiled|mixtral-blocks|router-bias) ;;
    *)
      echo "error: unknown check '$name' (mxfp4-fp-order, qmm-order, softmax-layers, gqa-prologue, oai-down, moe-block-compiled, mixtral-blocks, router-bias)" >&2
      exit 2
      ;;
  esac
done
out=${OUT:-gpu-results}
if ! python3 -c "import mlx.core as mx, sys; sys.exit(0 if mx.default_device() == mx.gpu else 1)" 2>/dev/null; then
  echo "error: switch_checks needs MLX's GPU backend (source benchmarks/gpu/env.sh first)" >&2
  exit 2
fi
out="$out/switch-checks-$(date -u +%Y%m%dT%H%M%S)"
mkdir -p "$out"
run_tests() {  # name, limit, pytest args...
  local name=$1 limit=$2; shift 2
  if [ "${#wanted[@]}" -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then
    return 0
  fi
  PYTHONUNBUFFERED=1 timeout "$limit" python3 -m pytest -v -p no:cacheprovider -m cuda -rf -n 4 "$@" \
    > "$out/switch-$name.log" 2>&1
  local rc=$?
  local passed failed
  passed=$(grep -c ' PASSED' "$out/switch-$name.log" || true)
  failed=$(grep -c ' FAILED' "$out/switch-$name.log" || true)
  if [ "$rc" = 0 ] && [ "$passed" -gt 0 ]; then
    echo "$name: PASS ($passed passed)"
  else
    echo "$name: FAIL (pytest rc $rc, $passed passed, $failed failed; $out/switch-$name.log)"
  fi
}
{
  run_tests mxfp4-fp-order 200 tests/kernels/test_mxfp4_experts.py -k "fp_order"
  run_tests qmm-order 600 tests/kernels/test_qmm_experts.py tests/kernels/test_mla_q_prep_embed.py \
    tests/patch/test_mla_prologue_embed.py tests/kernels/test_moe_block_qmm.py
  run_tests softmax-layers 300 tests/patch/test_moe_block_softmax.py
  run_tests gqa-prologue 400 tests/patch/test_gqa_prologue.py tests/kernels/test_qk_norm_rope_variants.py \
    tests/kernels/test_qk_norm_rope.py
  run_tests oai-down 300 tests/kernels/test_moe_down_bias.py tests/patch/test_moe_block_softmax.py
  run_tests moe-block-compiled 300 tests/patch/test_moe_block_compiled.py
  run_tests mixtral-blocks 300 tests/patch/test_moe_block_softmax.py tests/patch/test_gqa_prologue.py -k mixtral
  run_tests router-bias 300 tests/kernels/test_softmax_router.py tests/patch/test_moe_block_softmax.py -k "bias"
} | tee "$out/switch-summary.log"
