"""Per-kernel micro-benchmark: each fused kernel against the stock op sequence it replaces.

For every case (GLM-4.7-Flash shapes) both sides run on the same fixed inputs:
- `gpu_us`: summed device time of the kernels one call launches (PyTorch's profiler
  over `iters` calls, CUPTI device timestamps), median over `repeats` blocks;
- `launches`: kernels per call;
- `wall_us`: host time per call including `mx.eval` (launch + sync), median over blocks;
- `graph_us`: time per call when `iters` calls are built into one graph and evaluated
  once, as a model's forward is (host graph building and encoding overlap the GPU),
  median over blocks: the figure that predicts the effect on decode;
- `bitwise`: whether the fused outputs equal stock's.
GPU time needs the CUDA backend and PyTorch; elsewhere only wall time is taken (and
the "fused" side is the reference, since custom kernels do not run on the CPU).
`zmlx report` (zmlx.cli.report) prints the rows as a table.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from zmlx import backend
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.downproj_combine import reference as downproj_stock
from zmlx.kernels.glm47_rope import glm47_rope, rope_table
from zmlx.kernels.glm47_rope import reference as rope_stock
from zmlx.kernels.mla_attention import mla_decode, mla_embed_q, mla_unembed
from zmlx.kernels.moe_combine import moe_combine
from zmlx.kernels.moe_mlp import moe_mlp, quantized_experts
from zmlx.kernels.moe_mlp import reference as moe_mlp_stock
from zmlx.kernels.moe_router import moe_router
from zmlx.kernels.residual_norm import residual_norm
from zmlx.kernels.swiglu_mlp import quantized_linear, swiglu_mlp
from zmlx.kernels.swiglu_mlp import reference as swiglu_stock


@dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    stock: Callable[[], Any]
    fused: Callable[[], Any]


def _glm_cases(tokens: int) -> list[Case]:
    from mlx_lm.models.glm4_moe_lite import group_expert_select

    k = mx.random.key(tokens)
    ks = mx.random.split(k, 8)
    gates = mx.random.normal((1, tokens, 64), key=ks[0]).astype(mx.bfloat16)
    bias = mx.random.normal((64,), key=ks[1]) * 0.05
    y = mx.random.normal((1, tokens, 4, 2048), key=ks[2]).astype(mx.bfloat16)
    scores = mx.random.uniform(shape=(1, tokens, 4), key=ks[3])
    shared = mx.random.normal((1, tokens, 2048), key=ks[4]).astype(mx.bfloat16)
    x = mx.random.normal((1, tokens, 2048), key=ks[5]).astype(mx.bfloat16)
    r = mx.random.normal((1, tokens, 2048), key=ks[6]).astype(mx.bfloat16)
    w = (1 + 0.1 * mx.random.normal((2048,), key=ks[7])).astype(mx.bfloat16)
    mx.eval(gates, bias, y, scores, shared, x, r, w)
    shape = f"{tokens} token{'s' if tokens > 1 else ''}"

    def stock_combine():
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype) + shared

    def stock_residual_norm():
        h = x + r
        return h, mx.fast.rms_norm(h, w, 1e-5)

    cases = [
        Case(
            "moe_router",
            f"{shape}, 64 experts, top-4",
            lambda: group_expert_select(gates, bias, 4, 1, 1, 1.8, True),
            lambda: moe_router(gates, bias, top_k=4, routed_scaling_factor=1.8, renorm_eps=1e-20),
        ),
        Case(
            "moe_combine",
            f"{shape}, 4 x 2048 + shared",
            stock_combine,
            lambda: moe_combine(y, scores, shared),
        ),
        Case("residual_norm", f"{shape}, 2048", stock_residual_norm, lambda: residual_norm(x, r, w, 1e-5)),
    ]
    if tokens == 1:  # the decode kernels (prompts keep the stock path)
        xq = mx.random.normal((1, tokens, 2048), key=ks[0]).astype(mx.bfloat16)
        inds = (mx.arange(tokens * 4).reshape(1, tokens, 4) % 8).astype(mx.uint32)
        hq = mx.random.normal((1, tokens, 4, 1536), key=ks[1]).astype(mx.bfloat16)
        # affine 4-bit (group 64, bf16 scales), and bf16 weights where MLX's gather_mm runs
        # them (not on its CPU backend: float32 only there)
        for bits in (4, None) if backend.current() != "cpu" else (4,):
            cases += _expert_cases(shape, xq, inds, hq, scores, shared, bits)
        cases += _attention_cases(shape)
        from zmlx.bench import block_cases  # imports Case from here

        cases += block_cases.moe_block_cases() + block_cases.mla_block_cases()
        from zmlx.bench import qmm_cases  # imports Case from here

        cases += qmm_cases.qmm_cases()
    return cases


def _attention_cases(shape: str, contexts: tuple[int, ...] = (4096, 32768)) -> list[Case]:
    """GLM-4.7-Flash's MLA attention at decode (20 heads, nope 192, rope 64, latent 512, v 256,
    affine 4-bit embed_q / unembed_out): the rope, and the attention core after the
    projections over a cache of `context` positions (stock: mlx-lm's ops; no cache update)."""
    heads, nope, rd, r, v = 20, 192, 64, 512, 256
    scale = (nope + rd) ** -0.5
    ks = mx.random.split(mx.random.key(7), 6)
    q = mx.random.normal((1, 1, heads * (nope + rd)), key=ks[0]).astype(mx.bfloat16)
    ckv = mx.random.normal((1, 1, r + rd), key=ks[1]).astype(mx.bfloat16)
    kw = dict(group_size=64, bits=4)
    embed = quantized_experts(heads, r, nope, dtype=mx.bfloat16, seed=8, **kw)
    unembed = quantized_experts(heads, v, r, dtype=mx.bfloat16, seed=9, **kw)
    rope = dict(heads=heads, rope_dims=rd, base=1_000_000.0, rope_scale=1.0, scale=scale)
    mx.eval(q, ckv, embed, unembed)
    cases = []
    pos = 4095
    table = rope_table(rd, 1_000_000.0, 1.0, pos + 1)
    mx.eval(table)
    cases.append(
        Case(
            "glm47_rope",
            f"{shape}, 20 heads + k_pe, position {pos}",
            lambda: rope_stock(q, ckv, table, pos, **rope),
            lambda: glm47_rope(q, ckv, table, pos, **rope),
        )
    )
    for context in contexts:
        lat = mx.random.normal((1, 1, context, r), key=ks[2]).astype(mx.bfloat16)
        kpe = mx.random.normal((1, 1, context, rd), key=ks[3]).astype(mx.bfloat16)
        q_pe = (mx.random.normal((1, heads, 1, rd), key=ks[4]) * 0.1).astype(mx.bfloat16)
        mx.eval(lat, kpe, q_pe)

        def stock(lat=lat, kpe=kpe, q_pe=q_pe):
            q_nope = q.reshape(1, 1, heads, nope + rd).transpose(0, 2, 1, 3)[..., :nope]
            pe_scores = q_pe @ kpe.swapaxes(-1, -2)
            q_abs = mx.quantized_matmul(q_nope, *embed, transpose=True, **kw)
            out = mx.fast.scaled_dot_product_attention(q_abs, lat, lat, scale=scale, mask=pe_scores)
            return mx.quantized_matmul(out, *unembed, transpose=True, **kw)

        def fused(lat=lat, kpe=kpe, q_pe=q_pe):
            qv = mla_embed_q(q, *embed, heads=heads, head_dim=nope + rd, nope=nope, **kw)
            o, m, lsum = mla_decode(qv, q_pe, lat, kpe, scale=scale)
            return mla_unembed(o, m, lsum, *unembed, dtype=mx.bfloat16, **kw)

        cases.append(Case("mla_attention (close)", f"{shape}, context {context}, 4-bit", stock, fused))
    return cases


def _expert_cases(shape: str, x, inds, h, scores, shared, bits) -> list[Case]:
    """The expert and dense-MLP kernels at GLM-4.7-Flash's size (8 experts stored: a call
    reads only its 4 either way)."""
    kw = dict(group_size=64 if bits else None, bits=bits)
    what = f"{bits}-bit" if bits else "bf16"
    gate = quantized_experts(8, 1536, 2048, dtype=mx.bfloat16, seed=1, **kw)
    up = quantized_experts(8, 1536, 2048, dtype=mx.bfloat16, seed=2, **kw)
    down = quantized_experts(8, 2048, 1536, dtype=mx.bfloat16, seed=3, **kw)
    mx.eval(gate, up, down)
    mlp_args = (x, inds, *gate, *up)
    down_args = (h, inds, scores, *down, shared)
    cases = [
        Case(
            "moe_mlp",
            f"{shape}, 4 x 2 x 1536 x 2048, {what}",
            lambda: moe_mlp_stock(*mlp_args, **kw),
            lambda: moe_mlp(*mlp_args, **kw),
        ),
        Case(
            "downproj_combine",
            f"{shape}, 4 x 2048 x 1536, {what} + shared",
            lambda: downproj_stock(*down_args, **kw),
            lambda: downproj_combine(*down_args, **kw),
        ),
    ]
    for rows, role in ((1536, "shared expert"), (10240, "dense layer")):
        dense = (
            x,
            *quantized_linear(rows, 2048, dtype=mx.bfloat16, seed=4, **kw),
            *quantized_linear(rows, 2048, dtype=mx.bfloat16, seed=5, **kw),
        )
        mx.eval(dense)
        cases.append(
            Case(
                "swiglu_mlp",
                f"{shape}, {role} 2 x {rows} x 2048, {what}",
                functools.partial(swiglu_stock, *dense, **kw),
                functools.partial(swiglu_mlp, *dense, **kw),
            )
        )
    return cases


def _wall_us(fn: Callable[[], Any], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    return (time.perf_counter() - t0) / iters * 1e6


def _graph_us(fn: Callable[[], Any], iters: int) -> float:
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(iters)])
    return (time.perf_counter() - t0) / iters * 1e6


def _kernel_events(fn: Callable[[], Any], iters: int) -> list:
    """The CUDA kernel events of `iters` evaluated calls (PyTorch's profiler, CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    from zmlx.bench.harness import cuda_kernels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(activities=[ProfilerActivity.CUDA])
    with prof:
        for _ in range(iters):
            mx.eval(fn())
    return cuda_kernels(prof)


def _profile(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    kernels = _kernel_events(fn, iters)
    return sum(e.time_range.elapsed_us() for e in kernels) / iters, len(kernels) / iters


def fallbacks() -> dict[str, str]:
    """Kernels whose self-check failed on this backend (they ran their reference): name -> why."""
    from zmlx.patch import PATTERNS

    here = backend.current()
    kernels = {k.name: k for p in PATTERNS.values() for k in p.kernels}
    return {name: k._status[here] for name, k in kernels.items() if k._status.get(here)}


def breakdown(fn: Callable[[], Any], iters: int = 20) -> list[tuple[str, float, float]]:
    """(kernel name, launches per call, GPU µs per call) of what one call runs, longest
    first (CUDA + PyTorch only): where a case's time goes."""
    from collections import defaultdict

    mx.eval(fn())
    per: dict[str, list[float]] = defaultdict(list)
    for e in _kernel_events(fn, iters):
        per[e.name[:90]].append(e.time_range.elapsed_us())
    rows = [(name, len(ts) / iters, sum(ts) / iters) for name, ts in per.items()]
    return sorted(rows, key=lambda r: -r[2])


def _equal(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def cases(tokens: tuple[int, ...] = (1, 32), only: list[str] | None = None) -> list[Case]:
    """The benchmark's cases; `only`: those of these kernels (names as in the table, without
    a "(close)" suffix); ValueError for unknown names."""
    found = [c for t in tokens for c in _glm_cases(t)]
    if only:
        known = {c.kernel.split(" (")[0] for c in found}
        if unknown := sorted(set(only) - known):
            raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        found = [c for c in found if c.kernel.split(" (")[0] in only]
    return found


def run(
    iters: int = 200,
    repeats: int = 7,
    tokens: tuple[int, ...] = (1, 32),
    progress: Callable[[str], None] | None = None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (case, side). Wall time first for every case; the profiler (which
    slows every later launch once attached) only after all wall-time blocks. `only`: the
    cases of these kernels (names as in the table, without a "(close)" suffix)."""
    todo = cases(tokens, only)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for case in todo:
        for side, fn in (("stock", case.stock), ("fused", case.fused)):
            mx.eval(fn())  # build / compile outside the timing
        walls: dict[str, list[float]] = {"stock": [], "fused": []}
        graphs: dict[str, list[float]] = {"stock": [], "fused": []}
        for _ in range(repeats):  # alternate the sides block by block
            for side, fn in (("stock", case.stock), ("fused", case.fused)):
                walls[side].append(_wall_us(fn, iters))
                graphs[side].append(_graph_us(fn, iters))
        equal = _equal(case.fused(), case.stock())
        for side in ("stock", "fused"):
            rows[(case.kernel, case.shape, side)] = {
                "kernel": case.kernel,
                "shape": case.shape,
                "side": side,
                "wall_us": statistics.median(walls[side]),
                "wall_us_blocks": walls[side],
                "graph_us": statistics.median(graphs[side]),
                "graph_us_blocks": graphs[side],
                "gpu_us": None,
                "launches": None,
                "bitwise": equal,
            }
        if progress:
            progress(f"wall {case.kernel} {case.shape}")
    if backend.current() == "cuda":
        try:
            import torch.profiler  # noqa: F401
        except ImportError:
            return list(rows.values())
        for case in todo:
            for side, fn in (("stock", case.stock), ("fused", case.fused)):
                blocks = [_profile(fn, iters) for _ in range(repeats)]
                row = rows[(case.kernel, case.shape, side)]
                row["gpu_us"] = statistics.median(b[0] for b in blocks)
                row["gpu_us_blocks"] = [b[0] for b in blocks]
                row["launches"] = statistics.median(b[1] for b in blocks)
            if progress:
                progress(f"gpu {case.kernel} {case.shape}")
    return list(rows.values())
