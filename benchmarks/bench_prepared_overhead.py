#!/usr/bin/env python3
"""zmlx's own Python per prepared launch, with MLX's kernel call replaced by a no-op.

    .venv/bin/python benchmarks/bench_prepared_overhead.py [--calls 2000] [--repeats 7]

Each kernel of the moe_block is prepared for the CUDA backend on its example() inputs,
with the built kernel replaced by a function that returns preallocated outputs, so the
time per call is what zmlx adds on the host to MLX's own cost of a custom-kernel call:
the live inputs put in their slots and the call. `block` times a whole decode step of one
moe_block layer of the tiny synthetic model the same way (step key, weight check, three
launches); `softmax_*` times a Qwen3-MoE layer's MoE half at decode through moe_block
and through the module patterns; `gqa_half` a Qwen3-MoE layer's attention half at decode as
mlx-lm's ops and through gqa_prologue; `compiled_step` times compiled_decode's own Python per decode step of a
47-layer model, the compiled graph's replay replaced likewise. Prints the median over
repeats, in microseconds per call (and with --capsule-dir, a repro capsule). Runs on any machine;
tests/kernels/test_prepared.py holds the CPU-side bound.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import mlx.core as mx

from zmlx import backend
from zmlx.bench import capsule, stamp
from zmlx.cli import args as cli_args
from zmlx.kernels import core
from zmlx.kernels.core import KernelDef, Launch
from zmlx.kernels.prepared import prepare
from zmlx.patch.layer import Routing

# kernel -> the positions of its example() arguments that change per decode step
LIVE = {
    "norm_router_gates": (0, 1),
    "moe_gate_up_route": (0, 1),
    "norm_router": (0, 1),
    "moe_gate_up": (0, 1),
    "moe_mlp": (0, 1),
    "moe_down": (0, 1, 2, 6, 7),
    "residual_norm": (0, 1),
    "swiglu_mlp": (0,),
    "softmax_router": (0,),
}


def _noop(kernel: KernelDef, backend_name: str):
    """A stand-in for the built kernel: returns zeros of the launch's output shapes, made once
    per shapes and dtypes (MLX's own cost of making a call's outputs is left out on every
    path). A prepared launch hands the same list each call: found by identity, no hashing."""
    made: dict = {}

    def call(inputs, output_shapes, output_dtypes, **_):
        hit = made.get(id(output_shapes))
        if hit is not None and hit[0] is output_shapes:
            return hit[1]
        key = (tuple(tuple(s) for s in output_shapes), tuple(output_dtypes))
        out = made.get(key)
        if out is None:
            out = made[key] = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        made[id(output_shapes)] = (output_shapes, out)  # held: its id is not reused meanwhile
        return out

    return call


@contextlib.contextmanager
def noop_kernels(kernels, backend_name: str = "cuda") -> Iterator[None]:
    """`kernels` planned as passing their self-check on `backend_name`, built as no-ops."""
    saved = {k: k._status.get(backend_name) for k in kernels}
    build = core.build
    core.build = lambda k, b: _noop(k, b)  # type: ignore[assignment]
    try:
        for k in kernels:
            k._status[backend_name] = ""
        yield
    finally:
        core.build = build  # type: ignore[assignment]
        for k, status in saved.items():
            if status is None:
                k._status.pop(backend_name, None)
            else:
                k._status[backend_name] = status


def median_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """The median over `repeats` of the time per call of `fn`, in microseconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def launches(calls: int = 2000, repeats: int = 7) -> dict[str, float]:
    """kernel name -> median µs of Python per prepared launch (no-op kernel)."""
    from zmlx.patch.patterns.moe_block import PATTERN

    out = {}
    with noop_kernels(PATTERN.kernels):
        for k in PATTERN.kernels:
            args, kwargs = k.example()
            live = LIVE[k.name]
            assert isinstance(k.launch("cuda", *args, **kwargs), Launch), k.name
            p = prepare(k, args, kwargs, live, "cuda")
            assert p.path == "kernel", (k.name, p.reason)
            arrays = tuple(args[i] for i in live)
            out[k.name] = median_us(lambda p=p, arrays=arrays: p(*arrays), calls, repeats)
    return out


def block(calls: int = 500, repeats: int = 7) -> float:
    """Median µs of Python for one moe_block decode step of a MoE layer (after attention):
    the step key, the weight check and the three launches (no-op kernels)."""
    from zmlx import synth
    from zmlx.patch.patterns import moe_block

    model, _ = synth.build("synth:glm4_moe_lite/tiny/affine4")
    layer = model.model.layers[1]
    x = mx.zeros((1, 1, model.args.hidden_size), mx.bfloat16)
    r = mx.ones((1, 1, model.args.hidden_size), mx.bfloat16)
    current = backend.current
    backend.current = lambda: "cuda"  # type: ignore[assignment]
    try:
        with noop_kernels(moe_block.PATTERN.kernels):
            first = moe_block._block(layer, x, r, Routing(1e-20))
            assert not isinstance(first, str), first
            return median_us(lambda: moe_block._block(layer, x, r, Routing(1e-20))(x, r), calls, repeats)
    finally:
        backend.current = current  # type: ignore[assignment]


def softmax_half(calls: int = 500, repeats: int = 7) -> dict[str, float]:
    """Median µs of Python for one decode step's MoE half of a Qwen3-MoE layer (after
    attention, tiny synthetic model, no-op kernels), three ways: `stock` (mlx-lm's ops: their
    graph building only, nothing is evaluated), `moe_block` (the step key, the
    weight check, residual_norm, mlx-lm's gate module, softmax_router, moe_mlp, moe_down) and
    `modules` (mlx-lm's layer code around the module patterns of the family's CUDA preset:
    softmax_router's and downproj_combine's block __call__, moe_mlp's experts; each kernel
    call computes its launch). MLX's graph building of the stock ops is in both."""
    import zmlx
    from zmlx import synth
    from zmlx.patch import PATTERNS
    from zmlx.patch.layer import stock_moe
    from zmlx.patch.patterns import moe_block

    model, _ = synth.build("synth:qwen3_moe/tiny/affine4")
    layer = model.model.layers[1]
    # top-4: 4 expert rows, qmv's regime (the tiny widths are not qmm_sm80's tiles, where 8
    # rows would skip to the reference); the Python per call is the same either side of 8
    layer.mlp.top_k = 4
    x = mx.zeros((1, 1, model.args.hidden_size), mx.bfloat16)
    r = mx.ones((1, 1, model.args.hidden_size), mx.bfloat16)
    modules = ["softmax_router", "downproj_combine", "moe_mlp"]
    kernels = {k for name in modules + ["moe_block"] for k in PATTERNS[name].kernels}
    current = backend.current
    backend.current = lambda: "cuda"  # type: ignore[assignment]
    out = {"stock": median_us(lambda: stock_moe(layer, x, r), calls, repeats)}  # mlx-lm's ops
    switch = moe_block.SOFTMAX_LAYERS
    moe_block.SOFTMAX_LAYERS = True  # the layer the block would take (its switch aside)
    try:
        with noop_kernels(kernels):
            zmlx.patch(model, patterns=["moe_block"])
            out["moe_block"] = median_us(
                lambda: moe_block.moe_half(layer, x, r, Routing(softmax_first=True)), calls, repeats
            )
            plan = moe_block.decode_plan(layer)
            assert list(plan.values()) == ["kernel: residual_norm, softmax_router, moe_mlp, moe_down"], plan
            zmlx.unpatch(model)
            zmlx.patch(model, patterns=modules)
            out["modules"] = median_us(lambda: stock_moe(layer, x, r), calls, repeats)
            zmlx.unpatch(model)
    finally:
        backend.current = current  # type: ignore[assignment]
        moe_block.SOFTMAX_LAYERS = switch
    return out


def gqa_half(calls: int = 500, repeats: int = 7) -> dict[str, float]:
    """Median µs of Python for one decode step's attention half of a Qwen3-MoE layer (tiny
    synthetic model, a KVCache at position 16 every call, no-op kernels), two ways: `stock`
    (mlx-lm's input norm and attention: their graph building only, nothing is evaluated) and
    `gqa_prologue` (the step key, the weight check, norm_qkv_a, qk_norm_rope, then mlx-lm's
    cache update, attention and o_proj)."""
    from mlx_lm.models.cache import KVCache

    import zmlx
    from zmlx import synth
    from zmlx.patch.mla_layer import stock_attention
    from zmlx.patch.patterns import gqa_prologue

    model, _ = synth.build("synth:qwen3_moe/tiny/affine4")
    layer = model.model.layers[1]
    width = model.args.hidden_size
    cache = KVCache()  # 16 positions, then every timed call writes position 16 again
    layer.self_attn(layer.input_layernorm(mx.zeros((1, 16, width), mx.bfloat16)), mask="causal", cache=cache)
    mx.eval(cache.state)
    x = mx.zeros((1, 1, width), mx.bfloat16)

    def at_16(half):
        def call():
            cache.offset = 16
            return half(layer, x, None, cache)

        return call

    current = backend.current
    backend.current = lambda: "cuda"  # type: ignore[assignment]
    try:
        out = {"stock": median_us(at_16(stock_attention), calls, repeats)}
        with noop_kernels(gqa_prologue.PATTERN.kernels):
            zmlx.patch(model, patterns=["gqa_prologue"])
            try:
                out["gqa_prologue"] = median_us(at_16(gqa_prologue.attention_half), calls, repeats)
                plan = list(gqa_prologue.decode_plan(layer).values())
                assert plan == ["kernel: norm_qkv_a, qk_norm_rope"], plan
            finally:
                zmlx.unpatch(model)
    finally:
        backend.current = current  # type: ignore[assignment]
    return out


def compiled_step(layers: int = 47, calls: int = 500, repeats: int = 7) -> float:
    """Median µs of compiled_decode's Python per decode step of a model with `layers` layers
    (GLM-4.7-Flash has 47), the compiled graph's replay replaced by a function returning
    preallocated outputs: the regime check (one token, static caches), the token's dtype,
    every cache's reserve and advance, the buffers' lists. What MLX adds (mx.compile's
    replay of the traced graph, then its evaluation) is the rest of the ledger's build and
    issue times."""
    from types import SimpleNamespace

    from zmlx.patch.patterns.compiled_decode import _Step, _stock_reason
    from zmlx.static_cache import StaticMLACache

    # room for every timed step, so no step grows a buffer (bucket growth is a copy: MLX's)
    caches = [StaticMLACache(min_capacity=calls * (repeats + 1) + 8) for _ in range(layers)]
    for c in caches:  # one prompt token: the buffers exist and the cache is not empty
        c.update_and_fetch(mx.zeros((1, 1, 1, 512), mx.bfloat16), mx.zeros((1, 1, 1, 64), mx.bfloat16))
    logits = mx.zeros((1, 1, 8), mx.float32)
    written = [c.keys for c in caches] + [c.values for c in caches]
    step = _Step(None, ())
    step._fn = lambda inputs, position, *buffers: (logits, position + 1, *written)
    token = mx.zeros((1, 1), mx.uint32)
    model = SimpleNamespace(layers=[None] * layers)

    def one_step():  # the patched __call__'s path: the regime check, then the step
        assert _stock_reason(model, token, caches) is None
        return step(model, token, caches)

    return median_us(one_step, calls, repeats)


def main() -> None:
    parser = cli_args.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks (median taken)")
    parser.add_argument("--capsule-dir", help="also write the numbers as a repro capsule there")
    a = parser.parse_args()
    if a.calls < 1 or a.repeats < 1:
        parser.error("--calls and --repeats must be at least 1")
    if why := capsule.dir_problem(a.capsule_dir):
        parser.error(why)
    try:
        git = stamp.git()  # before measuring: a bad stated commit stops the run first
    except stamp.GitStateError as e:
        parser.error(str(e))
    rows = [
        {"name": n, "what": "prepared launch", "us": us} for n, us in launches(a.calls, a.repeats).items()
    ]
    rows.append(
        {"name": "block", "what": "MoE layer step (3 launches)", "us": block(max(1, a.calls // 4), a.repeats)}
    )
    for how, us in softmax_half(max(1, a.calls // 4), a.repeats).items():
        what = f"Qwen3-MoE layer's MoE half ({how})"
        rows.append({"name": f"softmax_{how}", "what": what, "us": us})
    for how, us in gqa_half(max(1, a.calls // 4), a.repeats).items():
        rows.append({"name": f"gqa_{how}", "what": f"Qwen3-MoE layer's attention half ({how})", "us": us})
    us = compiled_step(47, max(1, a.calls // 4), a.repeats)
    rows.append(
        {"name": "compiled_step", "what": "compiled_decode step, 47 layers (replay not counted)", "us": us}
    )
    for r in rows:
        print(f"{r['name']:14s} {r['us']:6.2f} us per {r['what']}")
    if a.capsule_dir:
        cap = capsule.build(
            name="prepared_overhead",
            model={
                "name": "synth:glm4_moe_lite/tiny/affine4",
                "kind": "python-overhead",
                "family": "glm4_moe_lite",
            },
            params={"calls": a.calls, "repeats": a.repeats, "kernels": "no-op (zmlx's Python only)"},
            variants=[],
            git=git,
        )
        cap["overhead_us"] = rows
        try:
            print(capsule.write_or_say(cap, a.capsule_dir))
        except ValueError as e:  # the numbers are printed above
            parser.error(str(e))


if __name__ == "__main__":
    main()
