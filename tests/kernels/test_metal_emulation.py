"""Metal bodies compiled with g++ against metal_emu.h and run on the CPU, vs the reference."""

import mlx.core as mx
import pytest

from zmlx.kernels import metal_emu
from zmlx.kernels.core import KernelDef, Launch
from zmlx.kernels.moe_combine import moe_combine, reference

pytestmark = pytest.mark.skipif(
    not metal_emu.available(), reason="g++ not found: the Metal emulation needs it"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("metal-emu")


@pytest.mark.parametrize("lead,k,d", [((1, 1), 4, 2048), ((2, 3), 3, 123), ((5,), 1, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("with_shared", [True, False])
@pytest.mark.parametrize("scores_in_t", [False, True])  # a gate module's float32, a softmax router's T
def test_moe_combine_metal_body_is_bitwise_the_reference(
    workdir, lead, k, d, dtype, with_shared, scores_in_t
):
    seed = d + k
    y = (mx.random.normal((*lead, k, d), key=mx.random.key(seed)) * 3).astype(dtype)
    scores = mx.random.uniform(shape=(*lead, k), key=mx.random.key(seed + 1)) * 1.8
    scores = scores.astype(dtype) if scores_in_t else scores
    shared = mx.random.normal((*lead, d), key=mx.random.key(seed + 2)).astype(dtype) if with_shared else None
    got = metal_emu.run(moe_combine, y, scores, shared, workdir=workdir)  # outputs start as NaN
    want = reference(y, scores, shared)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert mx.array_equal(got, want).item()


# A kernel that uses the rest of the subset: threadgroup memory, barriers, simd reductions.
_ROWSUM = KernelDef(
    name="emu_rowsum",
    reference=lambda x: x.sum(axis=-1),
    body="""
threadgroup float partial[8];
const uint row = threadgroup_position_in_grid.x;
const uint i = thread_position_in_threadgroup.x;
float v = 0.0f;
for (uint j = i; j < C; j += 256) v += x[row * C + j];
v = v + simd_max(v) * 0.0f + simd_shuffle_xor(v, 1u) * 0.0f;  // uniform: every lane calls
v = simd_sum(v);
if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = v;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (i == 0) {
    float s = 0.0f;
    for (uint w = 0; w < 8; ++w) s += partial[w];
    out[row] = s;
}
""",
    input_names=("x",),
    output_names=("out",),
    launch=lambda backend, x: Launch(
        [x], [("C", x.shape[1])], (256 * x.shape[0], 1, 1), (256, 1, 1), [(x.shape[0],)], [mx.float32]
    ),
)


def test_emulation_runs_barriers_and_simd_reductions(workdir):
    x = mx.round(mx.random.normal((3, 1000), key=mx.random.key(5)) * 8)  # integers: any order is exact
    got = metal_emu.run(_ROWSUM, x, workdir=workdir)
    assert mx.array_equal(got, x.sum(axis=-1)).item()


def test_outside_the_subset_fails_with_a_clear_message(workdir):
    bad = KernelDef(
        name="emu_atomic",
        reference=lambda x: x,
        body="atomic_fetch_add_explicit(out, 1, memory_order_relaxed);",
        input_names=("x",),
        output_names=("out",),
        launch=lambda backend, x: Launch([x], [], (1, 1, 1), (1, 1, 1), [x.shape], [x.dtype]),
    )
    with pytest.raises(metal_emu.EmulationError, match="outside the subset"):
        metal_emu.run(bad, mx.zeros((1,)), workdir=workdir)


def test_unwritten_outputs_show_as_nan(workdir):
    skip_first = KernelDef(
        name="emu_skip_first",
        reference=lambda x: x,
        body="if (zmlx_tid > 0) out[zmlx_tid] = x[zmlx_tid];",
        input_names=("x",),
        output_names=("out",),
        launch=lambda backend, x: Launch([x], [], (x.size, 1, 1), (4, 1, 1), [x.shape], [x.dtype]),
    )
    got = metal_emu.run(skip_first, mx.arange(6, dtype=mx.float32), workdir=workdir)
    assert mx.isnan(got[0]).item() and mx.array_equal(got[1:], mx.arange(1, 6, dtype=mx.float32)).item()
