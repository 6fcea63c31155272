"""What the kernels that read mlx-lm's weights share: which layouts and regimes they take,
the stock op sequences their references use, and the weights of a projection as they take
them. Their device code is csrc/quant.h.

MLX's affine layout: each row of a (rows, cols) matrix is packed into uint32 words,
32 / bits values per word, lowest bits first; one scale and one bias per `group_size`
values of a row; a value dequantizes to `scale * q + bias`. mxfp4: 4-bit e2m1 values in
the same words, one uint8 e8m0 scale (a power of two) per 32 values, no biases; a value
dequantizes to `e2m1(q) * scale`. The expert kernels (moe_mlp, downproj_combine,
swiglu_mlp, moe_gate_up, moe_down) read both (`MODES`); the others affine only.

csrc/quant.h defines `zmlx_qdot_lane` (this lane's share of one packed row's dot product
with a vector), ZMLX_SIMD_SUM (the warp sum that finishes it) and `zmlx_swiglu`. On CUDA
they follow MLX's own qmv kernel and its compiled swiglu operation for operation, so the
kernels that use them are bitwise stock wherever stock runs qmv (fewer than
QMV_MAX_ROWS expert rows, scales in the activations' dtype); on Metal the dot is a plain
float32 sum (close, not exact). Kernels put it in their header (`device_code("quant.h")`);
the dot takes mxfp4 rows where the scales are uint8 (an overload, so the bodies name no
mode). mxfp4 follows qmv.cu as sm80/sm90 run it: MLX's fp_qmv serves a dense mxfp4 matmul
only on sm100 and later (`supports_fp_qmv`), never a gathered one, so there the dense
kernels are not bitwise.
"""

from __future__ import annotations

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
AFFINE = ("affine",)
MODES = ("affine", "mxfp4")  # what the expert kernels read


def layout_reason(bits: int, group_size: int, mode: str = "affine") -> str | None:
    """Why a layout is outside what the quantized kernels read, or None."""
    if mode == "mxfp4":
        return None if (bits, group_size) == (4, 32) else f"mxfp4 {bits}-bit, group {group_size}"
    if mode != "affine":
        return f"{mode} quantization"
    if bits not in BITS or group_size not in GROUP_SIZES:
        return f"affine {bits}-bit, group {group_size} (the kernels take 4/8-bit, groups 32/64/128)"
    return None


# MLX's CUDA gather_qmm runs its qmv kernel below this many rows (tokens x experts),
# a tiled qmm above it; the CUDA kernels follow qmv's arithmetic, so they serve only there.
QMV_MAX_ROWS = 8
# MLX 0.32.4's gather_qmm of mxfp4 expert rows runs its qmv (the kernels' order) for rows of
# 288 values but `fp_gather_qmv` (float sums per scale group: another order) for 1536 and
# 2048 (NOTEBOOK facts), so wide gathered mxfp4 rows were not bitwise (21 `cuda` tests of
# test_mxfp4_experts.py) until that kernel's order was followed (MXFP4_FP_ORDER, below).
MXFP4_GATHERED_MAX_COLS = 512
# Whether those rows run csrc/quant.h's zmlx_fp_qdot_lane (fp_qmv's order, which stock's
# fp_gather_qmv follows) instead of taking the reference: on since its `cuda` tests
# (test_mxfp4_experts.py -k fp_order: 21 passed, bitwise stock) ran on the H200 (2026-12-01).
MXFP4_FP_ORDER = True


def fp_order(backend: str, mode: str, cols: int) -> bool:
    """Whether a gathered row of `cols` values runs in fp_qmv's order (the launch's FPQMV)."""
    return MXFP4_FP_ORDER and backend == "cuda" and mode == "mxfp4" and cols > MXFP4_GATHERED_MAX_COLS


def qmv_reason(
    backend: str, rows: int, dtype, *scales_and_biases, max_rows: int = QMV_MAX_ROWS
) -> str | None:
    """Why a call is outside the regime where the CUDA kernels are bitwise stock's qmv, or None.
    `max_rows`: the fewest rows at which stock leaves qmv (gathered experts: 8; a dense
    quantized_matmul on sm90 (Hopper) leaves it from 2 rows, for its sm90 qmm)."""
    if backend != "cuda":
        return None
    if rows >= max_rows:
        return f"{rows} rows: stock uses a tiled qmm from {max_rows} rows (only its qmv is followed)"
    if any(a.dtype != dtype for a in scales_and_biases):
        return f"scales/biases not in the activations' dtype {dtype}"
    return None


# From QMV_MAX_ROWS rows MLX 0.32.4's CUDA quantized matmul runs qmm_sm80 where the output
# features are a multiple of QMM_TILE_N and the row width of max(64, group) (else qmm_naive),
# for bf16/half activations and 4/8-bit affine weights. Its order per output element is
# csrc/qmm_order.h's (weights rounded once from q * s + b, mma.sync over k-blocks of 16 in
# order: bitwise stock on the H200 in benchmarks/gpu/qmm_order_probe.py's 8 cases). QMM_ORDER:
# whether the expert kernels (moe_mlp, downproj_combine) follow it there instead of taking
# the reference; on since their `cuda` tests passed on the H200 (2026-12-01, switch_checks.sh:
# 49 passed in tests/kernels/test_qmm_experts.py, test_mla_q_prep_embed.py and
# tests/patch/test_mla_prologue_embed.py).
QMM_TILE_N = 128
QMM_ORDER = True
# The three switches below were built off until their cuda tests and the micro-benchmark ran
# on a GPU. On the H200 at dd92baa: the qmm-order cuda tests with all three on, 153 passed,
# none failed (log benchmarks/results/20261201-h200-qmm-switches-dd92baa.log); GPU time a
# call at Qwen3-30B-A3B's top-8 shapes, stock -> fused (capsule
# 20261201T221617_kernels-glm47-flash-shapes_cuda_kernel_microbench.json): moe_mlp 61.4 ->
# 17.1 us, downproj_combine 16.7 -> 9.2 us. So all three are on.
# downproj_combine's QMM variant (a block of k warps, the dots a chunk ahead): off, those rows
# take the reference (stock's ops).
QMM_DOWN = True
# moe_mlp's QMM variant with its dots loaded a chunk ahead (csrc/qmm_order.h's zmlx_qmm_rows8,
# the same mma in the same order; built after the H200 showed the plain loop latency-bound).
QMM_PIPELINED = True
# moe_block's launches 2 and 3 (moe_gate_up(_route), moe_down) in qmm_sm80's order for their
# routed rows where QMM_ORDER holds (8+ expert rows: top-8 decode), the shared expert's rows in
# qmv's order as before (tests/kernels/test_moe_block_qmm.py); off, those launches skip (qmv
# only) and moe_block leaves the step to mlx-lm.
QMM_BLOCK = True


def qmm_order(
    backend: str, rows: int, dtype, s, b, *, out_rows: int, cols: int, group_size, bits, mode, max_rows=0
) -> bool:
    """Whether a quantized matmul of `rows` rows (gathered: tokens x experts; MultiLinear's:
    sequences x heads, through qmm_embed_reason), `out_rows` outputs of `cols`-wide rows, is one
    the kernels run in qmm_sm80's order (QMM_ORDER). max_rows: where the caller stops (default
    mlx-lm's sort of gathered rows, MLX_LM_SORT_ROWS)."""
    import mlx.core as mx

    return (
        QMM_ORDER
        and backend == "cuda"
        and mode == "affine"
        and s is not None
        and b is not None
        and QMV_MAX_ROWS <= rows < (max_rows or MLX_LM_SORT_ROWS)
        and dtype in (mx.bfloat16, mx.float16)
        and s.dtype == dtype
        and b.dtype == dtype
        and bits in BITS
        and out_rows % QMM_TILE_N == 0
        and cols % max(64, group_size) == 0
    )


def qmm_embed_reason(
    backend: str, rows: int, dtype, s, b, out_rows: int, cols: int, *, group_size, bits, sequences: int = 1
) -> str | None:
    """Why MultiLinear's batched quantized matmul (embed_q: `rows` = sequences x heads) is not
    one a kernel may compute in qmm_sm80's order on this backend, or None: with QMM_ORDER, on
    CUDA where stock runs qmm_sm80 (no sort: any number of rows from 8); elsewhere (the CPU's
    reference, Metal's float32 sums: close) nothing more to check. A dense quantized_matmul
    (unlike gather_qmm) takes MLX's sm90 kernel on Hopper where a group spans the whole row
    (v0.32.1's supports_qmm_sm90: group_size >= K), another order; and over more than one
    sequence MLX broadcasts the (heads, rows, cols) weights, which its qmm_sm80 reads with a
    zero batch stride (read in its source, not run): both are left to stock."""
    if not QMM_ORDER:
        return "quant.QMM_ORDER is off (qmm_sm80's order waits for its cuda tests)"
    if backend == "cuda" and group_size is not None and group_size >= cols:
        return f"groups of {group_size} span the {cols}-wide rows: stock's sm90 qmm, another order"
    if backend == "cuda" and sequences > 1:
        return f"{sequences} sequences: stock broadcasts the heads' weights over them (left to stock)"
    kw = dict(out_rows=out_rows, cols=cols, group_size=group_size, bits=bits, mode="affine")
    if backend == "cuda" and not qmm_order(backend, rows, dtype, s, b, max_rows=2**31, **kw):
        return (
            f"{rows} rows of {cols} into {out_rows}, {bits}-bit groups of {group_size}: not stock's qmm_sm80"
        )
    return None


# mlx-lm's SwitchGLU sorts its (token, expert) rows by expert from this many on (and then
# calls gather_(q)mm with sorted indices): the expert patterns leave such calls to mlx-lm.
MLX_LM_SORT_ROWS = 64
# ... and MLX's CUDA gather_mm leaves its gemv there: unquantized experts are followed below.
GEMV_MAX_ROWS = MLX_LM_SORT_ROWS


def gemv_reason(backend: str, rows: int, dtype, *weights, max_rows: int = GEMV_MAX_ROWS) -> str | None:
    """`qmv_reason` for unquantized weights: stock's gemv regime, weights in x's dtype."""
    if any(w.dtype != dtype for w in weights):
        return f"weights not in the activations' dtype {dtype}"
    if backend == "cuda" and rows >= max_rows:
        return f"{rows} rows: stock leaves its gemv from {max_rows} rows (only its gemv is followed)"
    return None


def quantized_reason(name: str, proj, modes: tuple[str, ...] = AFFINE, bias: bool = False) -> str | None:
    """Why a quantized projection (mlx-lm's QuantizedSwitchLinear for experts, mlx's
    QuantizedLinear for dense layers) cannot go through kernels that read `modes` (and add
    its bias, with `bias`), or None."""
    if proj.mode not in modes:
        return f"{name} is {proj.mode}-quantized ({' or '.join(modes)} only)"
    if (why := layout_reason(proj.bits, proj.group_size, proj.mode)) is not None:
        return f"{name}: {why}"
    if ("bias" in proj and not bias) or getattr(proj, "global_scale", None) is not None:
        return f"{name} has a bias or a global scale"
    return None


def gathered(x, w, s, b, inds, group_size, bits, mode="affine"):
    """mlx-lm's (Quantized)SwitchLinear on x (..., 1, 1, D): gather_qmm, or gather_mm for
    unquantized weights (s None)."""
    import mlx.core as mx

    if s is None:
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=inds)
    return mx.gather_qmm(
        x, w, s, b, rhs_indices=inds, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def dequantized(w, s, b, group_size, bits, mode="affine"):
    """The weights in float32 (dequantized when quantized): for float32 accuracy bars."""
    import mlx.core as mx

    if s is None:
        return w.astype(mx.float32)
    if mode != "affine":  # e2m1 times a power of two: exact in float32
        return mx.dequantize(w, s, None, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)


def or_placeholder(a, placeholder):
    """Unquantized rows have no scales or biases: the kernel's inputs get `placeholder`."""
    return placeholder if a is None else a


_FLOATS = ("bfloat16", "float16", "float32")


def weights_reason(w, s, b, *, cols: int, group_size, bits, dtype, mode="affine") -> str | None:
    """Why a weight matrix (or stack of them) of `cols`-wide rows cannot be read by the
    kernels, or None: affine-quantized (packed w, scales s, biases b), mxfp4 (packed w,
    uint8 scales s, b None) or unquantized (s and b None, w in the activations' dtype)."""
    if s is None:
        if b is not None or w.dtype != dtype:
            return f"unquantized weights {w.dtype} for activations {dtype}"
        return None if w.shape[-1] == cols else f"weights {w.shape} for rows of {cols}"
    if (why := layout_reason(bits, group_size, mode)) is not None:
        return why
    scales = str(s.dtype).split(".")[-1]
    if mode == "mxfp4":
        if b is not None:
            return "mxfp4 quantization with biases"
        if scales != "uint8":
            return f"mxfp4 scales {s.dtype} (e8m0 scales are uint8)"
    elif b is None:
        return "affine quantization without biases"
    elif scales not in _FLOATS:
        return f"scales {s.dtype}"
    if w.shape[-1] * (32 // bits) != cols or cols % group_size:
        return f"weights {w.shape} for rows of {cols}"
    if s.shape != w.shape[:-1] + (cols // group_size,) or (b is not None and b.shape != s.shape):
        return f"scales {s.shape} for groups of {group_size}"
    return None


def regime_reason(
    backend: str,
    rows: int,
    dtype,
    s,
    b,
    w,
    *,
    qmv_rows: int = QMV_MAX_ROWS,
    gemv_rows: int = GEMV_MAX_ROWS,
    mode: str = "affine",
    gathered_cols: int | None = None,
) -> str | None:
    """Where stock's CUDA matvec (qmv, or gemv for unquantized weights) runs, the kernels
    follow it; elsewhere they step aside (None: the kernel takes the call). `qmv_rows` is
    where affine weights leave qmv: mxfp4 ones have no sm90 qmm, so a dense matmul stays in
    qmv below QMV_MAX_ROWS as a gathered one does (and their scales are uint8 by layout).
    `gathered_cols`: the row width of a gathered (expert) matmul, for MXFP4_GATHERED_MAX_COLS."""
    if s is None:
        return gemv_reason(backend, rows, dtype, w, max_rows=gemv_rows)
    if mode == "mxfp4":
        wide = gathered_cols is not None and gathered_cols > MXFP4_GATHERED_MAX_COLS
        if backend == "cuda" and wide and not MXFP4_FP_ORDER:
            return (
                f"gathered mxfp4 rows of {gathered_cols} values: stock's order past "
                f"{MXFP4_GATHERED_MAX_COLS} is not known (not bitwise on MLX 0.32.4's CUDA)"
            )
        return qmv_reason(backend, rows, dtype, max_rows=QMV_MAX_ROWS)
    return qmv_reason(backend, rows, dtype, s, b, max_rows=qmv_rows)


def packing(cols: int, group_size, bits) -> tuple[int, int]:
    """(GS, BITS) template values: the quantization's, or (cols, 32) for unquantized rows."""
    return (cols, 32) if bits is None else (group_size, bits)


def dense_or_quantized(
    name: str, proj, quantized: type, dense: type[dict], modes: tuple[str, ...] = AFFINE, bias: bool = False
) -> str | None:
    """Why a projection can go through neither kernel path (quantized in one of `modes`, or
    unquantized; with `bias`, the kernel adds its bias). `dense` is an mlx module class: a
    dict of its parameters."""
    if isinstance(proj, quantized):
        return quantized_reason(name, proj, modes, bias)
    if isinstance(proj, dense):
        return f"{name} has a bias" if "bias" in proj and not bias else None
    return f"{name} is a {type(proj).__name__} (neither an affine-quantized nor an unquantized linear)"


def switch_linear_reason(name: str, proj, modes: tuple[str, ...] = AFFINE, bias: bool = False) -> str | None:
    """Why an mlx-lm expert projection (quantized in one of `modes`, or unquantized; with
    `bias`, the kernel adds its bias) cannot go through the kernels, or None."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return dense_or_quantized(name, proj, QuantizedSwitchLinear, SwitchLinear, modes, bias)


def linear_reason(name: str, proj, modes: tuple[str, ...] = AFFINE) -> str | None:
    """Why a dense projection (quantized in one of `modes`, or unquantized) cannot go
    through the kernels, or None."""
    import mlx.nn as nn

    return dense_or_quantized(name, proj, nn.QuantizedLinear, nn.Linear, modes)


def weights_of(proj) -> tuple[tuple, dict]:
    """((weight, scales, biases), {group_size, bits[, mode]}) of a projection, as the
    kernels take them; scales, biases, group size and bits are None for unquantized
    weights, biases for mxfp4. `mode` is there only when not affine, so the affine-only
    kernels (which take no mode) get what they always got; their patterns refuse the rest."""
    packing = {"group_size": getattr(proj, "group_size", None), "bits": getattr(proj, "bits", None)}
    if getattr(proj, "mode", "affine") != "affine":
        packing["mode"] = proj.mode
    return (proj["weight"], proj.get("scales"), proj.get("biases")), packing
