"""The Metal emulation is as strict as a GPU: each small broken kernel here is caught on every
run (every seed), and its fixed twin passes. One kernel per defect the emulation used to hide:
order dependence across threadgroups, reads of threadgroup memory nobody wrote, bf16/half
arithmetic rounded once per expression instead of per operation, a simd reduction in a
divergent branch, and a missing threadgroup_barrier (a data race)."""

import dataclasses

import mlx.core as mx
import pytest

from zmlx.kernels import metal_emu
from zmlx.kernels.core import KernelDef, Launch
from zmlx.kernels.mla_attention import mla_embed_q, mla_unembed
from zmlx.kernels.residual_norm import residual_norm

pytestmark = pytest.mark.skipif(
    not metal_emu.available(), reason="g++ not found: the Metal emulation needs it"
)

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("metal-emu-strict")


def _kernel(name, body, reference, grid, group, out_dtype=mx.float32, template=()):
    """A float32 (or out_dtype) kernel of one input x and one output of x's shape."""
    return KernelDef(
        name=name,
        reference=reference,
        body=body,
        input_names=("x",),
        output_names=("out",),
        launch=lambda backend, x: Launch(
            [x], list(template), (grid, 1, 1), (group, 1, 1), [x.shape], [out_dtype]
        ),
    )


# ---- 1. order dependence across threadgroups: a running sum that reads the previous group's
# output works only when the groups run in the natural order (a GPU gives no order)
_CHAIN = """
if (zmlx_lid == 0) out[zmlx_gid] = x[zmlx_gid] + (zmlx_gid > 0 ? out[zmlx_gid - 1] : 0.0f);
"""
_CHAIN_FIXED = """
if (zmlx_lid == 0) {
    float s = 0.0f;
    for (uint g = 0; g <= zmlx_gid; ++g) s += x[g];
    out[zmlx_gid] = s;
}
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_threadgroups_run_in_a_seeded_order_that_breaks_an_order_dependence(workdir, seed):
    x = mx.arange(1, 9, dtype=mx.float32)
    want = mx.cumsum(x)
    kw = dict(reference=mx.cumsum, grid=8 * 32, group=32)
    broken = metal_emu.run(_kernel("emu_chain", _CHAIN, **kw), x, workdir=workdir, seed=seed)
    assert not mx.array_equal(broken, want).item()  # a group read a later group's unwritten output
    fixed = metal_emu.run(_kernel("emu_chain_fixed", _CHAIN_FIXED, **kw), x, workdir=workdir, seed=seed)
    assert mx.array_equal(fixed, want).item()


# ---- 2. threadgroup memory is undefined at a group's start: a kernel that zeroes only in
# its first group (or never) used to read zeros left over from a previous group
_ACCUM = """
ZMLX_SHARED float total[1];
if (zmlx_gid == 0 && zmlx_lid == 0) total[0] = 0.0f;  // broken: only the first group clears it
ZMLX_BARRIER;
if (zmlx_lid == 0) total[0] = total[0] + x[zmlx_gid];
ZMLX_BARRIER;
if (zmlx_lid == 0) out[zmlx_gid] = total[0];
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_unwritten_threadgroup_memory_is_caught(workdir, seed):
    x = mx.arange(1, 5, dtype=mx.float32)
    kw = dict(reference=lambda x: x, grid=4 * 32, group=32)
    with pytest.raises(metal_emu.EmulationError, match=r"reads threadgroup total\[0\] before any thread"):
        metal_emu.run(_kernel("emu_accum", _ACCUM, **kw), x, workdir=workdir, seed=seed)
    fixed = _ACCUM.replace("zmlx_gid == 0 && zmlx_lid == 0", "zmlx_lid == 0")
    got = metal_emu.run(_kernel("emu_accum_fixed", fixed, **kw), x, workdir=workdir, seed=seed)
    assert mx.array_equal(got, x).item()


# ---- 3. bf16 / half arithmetic rounds after every operation: `a * b + c` in T is not the
# float expression rounded once (the fixed twin computes in float, as its reference does)
_MULADD = "out[zmlx_tid] = x[zmlx_tid] * x[zmlx_tid] + x[zmlx_tid];"
_MULADD_FIXED = """
const float v = static_cast<float>(x[zmlx_tid]);
out[zmlx_tid] = static_cast<T>(v * v + v);
"""


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_16_bit_arithmetic_rounds_after_every_operation(workdir, dtype):
    x = (mx.random.normal((256,), key=mx.random.key(3)) * 3).astype(dtype)
    want = (x.astype(mx.float32) * x.astype(mx.float32) + x.astype(mx.float32)).astype(dtype)
    per_op = x * x + x  # MLX's own op sequence: one rounding per op
    assert not mx.array_equal(per_op, want).item()  # the inputs tell the two apart
    kw = dict(reference=lambda x: x, grid=256, group=64, out_dtype=dtype, template=[("T", dtype)])
    broken = metal_emu.run(_kernel("emu_muladd", _MULADD, **kw), x, workdir=workdir)
    assert mx.array_equal(broken, per_op).item() and not mx.array_equal(broken, want).item()
    fixed = metal_emu.run(_kernel("emu_muladd_fixed", _MULADD_FIXED, **kw), x, workdir=workdir)
    assert mx.array_equal(fixed, want).item()


# ---- 4. a simd reduction in a divergent branch: on a GPU each branch sums only its own lanes
_SPLIT_SUM = """
float v = x[zmlx_tid];
if (v > 0.0f) {
    v = simd_sum(v);
} else {
    v = simd_sum(-v);
}
if (zmlx_lane == 0) out[zmlx_warp] = v;
"""
_SPLIT_SUM_FIXED = """
const float v = simd_sum(metal::abs(x[zmlx_tid]));
if (zmlx_lane == 0) out[zmlx_warp] = v;
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_simd_reduction_in_a_divergent_branch_is_caught(workdir, seed):
    x = mx.random.normal((64,), key=mx.random.key(4))
    kw = dict(reference=lambda x: mx.abs(x).reshape(2, 32).sum(-1), grid=64, group=64)
    with pytest.raises(metal_emu.EmulationError, match="divergent simd op"):
        metal_emu.run(_kernel("emu_split_sum", _SPLIT_SUM, **kw), x, workdir=workdir, seed=seed)
    got = metal_emu.run(_kernel("emu_split_sum_fixed", _SPLIT_SUM_FIXED, **kw), x, workdir=workdir, seed=seed)
    assert mx.allclose(got[:2], mx.abs(x).reshape(2, 32).sum(-1), rtol=1e-6).item()


def test_a_lane_that_returned_before_a_simd_reduction_is_caught(workdir):
    body = "if (zmlx_lane == 31) return;\nconst float v = simd_sum(x[zmlx_tid]);\nout[zmlx_tid] = v;"
    with pytest.raises(metal_emu.EmulationError, match="has returned"):
        metal_emu.run(_kernel("emu_early_return", body, lambda x: x, 32, 32), mx.ones((32,)), workdir=workdir)


# ---- 5. a missing threadgroup_barrier: warp sums written to threadgroup memory and read by
# thread 0 with no barrier between (a race a GPU shows now and then; caught on every run here)
_WARP_SUMS = """
ZMLX_SHARED float partial[4];
const float v = simd_sum(x[zmlx_tid]);
if (zmlx_lane == 0) partial[zmlx_warp] = v;
ZMLX_BARRIER_HERE
if (zmlx_lid == 0) out[zmlx_gid] = partial[0] + partial[1] + partial[2] + partial[3];
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_a_missing_barrier_is_caught_as_a_race(workdir, seed):
    x = mx.round(mx.random.normal((256,), key=mx.random.key(5)) * 8)  # integers: any order is exact
    kw = dict(reference=lambda x: x, grid=256, group=128)
    broken = _kernel("emu_race", _WARP_SUMS.replace("ZMLX_BARRIER_HERE", ""), **kw)
    with pytest.raises(metal_emu.EmulationError, match=r"data race on threadgroup partial\[\d\]"):
        metal_emu.run(broken, x, workdir=workdir, seed=seed)
    fixed = _kernel("emu_race_fixed", _WARP_SUMS.replace("ZMLX_BARRIER_HERE", "ZMLX_BARRIER;"), **kw)
    got = metal_emu.run(fixed, x, workdir=workdir, seed=seed)
    assert mx.array_equal(got[:2], x.reshape(2, 128).sum(-1)).item()


def test_a_write_after_read_without_barrier_is_a_race(workdir):
    """Thread 1 overwrites what thread 0 reads in the same barrier interval (the second
    barrier of a double-buffered loop left out)."""
    body = """
ZMLX_SHARED float buf[2];
buf[zmlx_lid] = x[zmlx_lid];
ZMLX_BARRIER;
const float other = buf[1 - zmlx_lid];
buf[zmlx_lid] = other * 2.0f;
out[zmlx_lid] = other;
"""
    with pytest.raises(metal_emu.EmulationError, match="data race on threadgroup buf"):
        metal_emu.run(_kernel("emu_war", body, lambda x: x, 2, 2), mx.ones((2,)), workdir=workdir)


def test_out_of_bounds_threadgroup_index_is_caught(workdir):
    body = "ZMLX_SHARED float buf[4];\nbuf[zmlx_lid] = x[zmlx_lid];\nout[zmlx_lid] = 0.0f;"
    with pytest.raises(metal_emu.EmulationError, match=r"buf\[4\] is out of bounds"):
        metal_emu.run(_kernel("emu_oob", body, lambda x: x, 8, 8), mx.ones((8,)), workdir=workdir)


def test_a_barrier_in_divergent_control_flow_is_caught(workdir):
    body = "if (zmlx_lid < 16) { ZMLX_BARRIER; }\nout[zmlx_lid] = x[zmlx_lid];"
    with pytest.raises(metal_emu.EmulationError, match="threadgroup_barrier"):
        metal_emu.run(_kernel("emu_div_barrier", body, lambda x: x, 32, 32), mx.ones((32,)), workdir=workdir)


def _without_barrier(kernel, nth):
    parts = kernel.body.split("ZMLX_BARRIER;")
    body = "ZMLX_BARRIER;".join(parts[: nth + 1]) + "ZMLX_BARRIER;".join(parts[nth + 1 :])
    return dataclasses.replace(kernel, name=f"{kernel.name}_no_barrier{nth}", body=body, _status={})


@pytest.mark.parametrize(
    "kernel,nth",
    [(residual_norm, 0), (residual_norm, 1), (mla_embed_q, 0), (mla_unembed, 0), (mla_unembed, 1)],
    ids=lambda v: getattr(v, "name", v),
)
def test_every_barrier_of_the_real_kernels_is_needed(workdir, kernel, nth):
    """Leaving out any one barrier of a real kernel is a race the detector reports (so it sees
    what those kernels do with threadgroup memory); the kernels as written pass their own
    emulation tests."""
    assert kernel.body.count("ZMLX_BARRIER;") > nth
    args, kw = kernel.example()
    with pytest.raises(metal_emu.EmulationError, match="data race on threadgroup"):
        metal_emu.run(_without_barrier(kernel, nth), *args, **kw, workdir=workdir)
