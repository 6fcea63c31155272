"""KernelDef: reference on the CPU, the reason recorded whenever the reference runs."""

import mlx.core as mx
import pytest

from zmlx.kernels import core, metal_emu
from zmlx.kernels.core import KernelDef, Launch, Skip, compiler_error
from zmlx.kernels.moe_combine import moe_combine


def test_cpu_takes_the_reference_and_says_why():
    plan = moe_combine.plan("cpu")
    assert plan.path == "reference" and "CPU backend" in plan.reason


def test_a_kernel_without_body_says_so():
    k = KernelDef(name="nothing", reference=lambda x: x)
    assert k.plan("cuda") == ("cuda", "reference", "no cuda body for nothing yet")


def _one_output_kernel(name, body):
    def launch(backend, x):
        return Launch([x], [], (4, 1, 1), (4, 1, 1), [x.shape], [x.dtype])

    def example():
        return (mx.arange(4, dtype=mx.float32),), {}

    return KernelDef(
        name=name,
        reference=lambda x: x * 2,
        body=body,
        input_names=("x",),
        output_names=("out",),
        launch=launch,
        example=example,
    )


BROKEN_BODY = "out[zmlx_tid] = zmlx_undeclared_name * x[zmlx_tid];"


@pytest.fixture
def metal_by_emulation(monkeypatch, tmp_path):
    """The Metal backend's build and launch done by the emulation (g++), as on a Mac."""
    if not metal_emu.available():
        pytest.skip("needs g++")
    monkeypatch.setattr(
        KernelDef,
        "run_kernel",
        lambda self, backend, *a, **kw: metal_emu.run(self, *a, workdir=tmp_path, **kw),
    )


def test_a_kernel_that_does_not_compile_falls_back_with_the_compiler_error(metal_by_emulation):
    plan = _one_output_kernel("broken", BROKEN_BODY).plan("metal")
    assert plan.path == "reference"
    assert plan.reason.startswith("broken metal kernel failed to build or run: error:"), plan.reason
    assert "zmlx_undeclared_name" in plan.reason  # the compiler's own words about the body


def test_the_same_kernel_written_correctly_runs(metal_by_emulation):
    """The check above fails for the body, not for the route: fixed, the kernel runs."""
    k = _one_output_kernel("fixed", BROKEN_BODY.replace("zmlx_undeclared_name", "2.0f"))
    assert k.plan("metal") == ("metal", "kernel", "")


def test_the_reason_keeps_the_compiler_diagnostic():
    nvrtc = 'Failed to compile kernel: \nzmlx_k.cu(12): error: identifier "zmlx_nope" is undefined\n\n1 error'
    assert compiler_error(nvrtc) == 'error: identifier "zmlx_nope" is undefined'
    gxx = (
        "the Metal body does not build (outside the subset?): /tmp/"
        + "d/" * 150
        + "k.cpp:5:9: error: 'y' was not declared"
    )
    assert compiler_error(gxx) == "error: 'y' was not declared"
    assert compiler_error("[metal_kernel] No Metal back-end.\nmore") == "[metal_kernel] No Metal back-end."


@pytest.mark.cuda
def test_a_cuda_kernel_that_does_not_compile_falls_back_with_nvrtc_error():
    plan = _one_output_kernel("broken_cuda", BROKEN_BODY).plan("cuda")
    assert plan.path == "reference" and "zmlx_undeclared_name" in plan.reason, plan.reason
    fixed = _one_output_kernel("fixed_cuda", BROKEN_BODY.replace("zmlx_undeclared_name", "2.0f"))
    assert fixed.plan("cuda").path == "kernel"


def test_a_call_takes_the_kernel_when_its_launch_fits_and_the_reference_on_a_skip(monkeypatch):
    """KernelDef.__call__ on a backend whose self-check passed: the kernel for a Launch, the
    reference for a Skip (the kernel is faked: this runs on the CPU)."""
    k = KernelDef(
        name="choice_probe",
        reference=lambda x: x * 2,
        body="",
        launch=lambda backend, x: (
            Skip("odd length") if x.size % 2 else Launch([x], [], (1, 1, 1), (1, 1, 1), [], [])
        ),
    )
    monkeypatch.setattr(core._backend, "current", lambda: "cuda")
    monkeypatch.setattr(core, "build", lambda kernel, backend: lambda inputs, **kw: [inputs[0] * 3])
    k._status["cuda"] = ""  # its self-check passed
    assert k(mx.ones((4,))).tolist() == [3.0] * 4  # the kernel
    assert k(mx.ones((3,))).tolist() == [2.0] * 3  # the reference
    assert k.run_kernel("cuda", mx.ones((3,))) == Skip("odd length")
    k2 = KernelDef(
        name="skips_its_example",
        reference=lambda x: x,
        body="",
        launch=k.launch,
        example=lambda: ((mx.ones((3,)),), {}),
    )
    assert k2.plan("cuda") == (
        "cuda",
        "reference",
        "skips_its_example cuda kernel does not take its own example: odd length",
    )


def test_sources_share_one_body_with_a_prelude_per_backend():
    from zmlx.kernels.compact import compact

    cuda_header, cuda_src = moe_combine.source("cuda")
    metal_header, metal_src = moe_combine.source("metal")
    body = compact(moe_combine.body)  # what MLX gets (zmlx.kernels.compact)
    assert cuda_src.endswith(body) and metal_src.endswith(body)
    assert "__fmul_rn" in cuda_header and "thread_position_in_grid" in metal_src


def test_close_kernel_self_check_compares_within_its_tolerance(monkeypatch):
    """A `close` kernel whose output is off by more than its tolerance takes the reference."""
    import mlx.core as mx

    from zmlx.kernels.core import KernelDef

    k = KernelDef(
        name="close_probe",
        reference=lambda x: x,
        fidelity="close",
        tolerance=0.01,
        body="",
        example=lambda: ((mx.ones((4,)),), {}),
    )
    monkeypatch.setattr(KernelDef, "run_kernel", lambda self, backend, x: x * 1.001)
    assert k._check("cuda") == ""
    k2 = KernelDef(
        name="close_probe2",
        reference=lambda x: x,
        fidelity="close",
        tolerance=0.01,
        body="",
        example=lambda: ((mx.ones((4,)),), {}),
    )
    monkeypatch.setattr(KernelDef, "run_kernel", lambda self, backend, x: x * 1.1)
    assert "not within 0.01" in k2._check("cuda")


def test_backend_follows_the_default_device():
    from zmlx import backend

    before = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert backend.current() == "cpu"
    finally:
        mx.set_default_device(before)
    if before == mx.Device(mx.gpu):
        assert backend.current() in ("cuda", "metal")


def test_no_kernel_makes_an_index_array_per_call(monkeypatch):
    """MLX's CUDA backend puts a small array made on the host (an `mx.array([...])` of a
    length or position, made per call) in managed memory, and the kernel that reads it waits
    for the page. Per-call values travel
    in shapes, views or the template instead: a small integer input that is not one of the
    call's own arguments must be made once (the same array on every call), not per call."""
    from zmlx.kernels import quant
    from zmlx.patch import PATTERNS

    monkeypatch.setattr(quant, "QMM_ORDER", True)  # a switched-off launch holds the contract too
    kernels = {k.name: k for p in PATTERNS.values() for k in p.kernels}
    for name, k in sorted(kernels.items()):
        if k.example is None or k.launch is None:
            continue
        args, kwargs = k.example()
        own = [a for a in args if isinstance(a, mx.array)]
        for backend in ("cuda", "metal"):
            first, second = (k.launch(backend, *args, **kwargs) for _ in range(2))
            assert isinstance(first, Launch), (name, first)
            for a, b in zip(first.inputs, second.inputs):
                if any(a is x for x in own) or not (a.size <= 16 and mx.issubdtype(a.dtype, mx.integer)):
                    continue
                assert a is b, f"{name} ({backend}) makes a {a.dtype} array of {a.size} on every call"


def test_the_self_check_covers_a_variant_where_there_is_one(monkeypatch):
    """variant_example(backend): a second call (another variant of the body) checked after the
    example; None (no variant on that backend, or its switch off) checks the example only."""
    from zmlx.kernels.core import KernelDef

    on = {"variant": True}

    def kernel_of(wrong_variant):
        return lambda self, backend, x: x * (1.5 if wrong_variant and x.size > 4 else 1.0)

    def make(name):
        return KernelDef(
            name=name,
            reference=lambda x: x,
            body="",
            example=lambda: ((mx.ones((4,)),), {}),
            variant_example=lambda backend: (
                ((mx.ones((8,)),), {}) if on["variant"] and backend == "cuda" else None
            ),
        )

    monkeypatch.setattr(KernelDef, "run_kernel", kernel_of(wrong_variant=False))
    assert make("variant_ok")._check("cuda") == ""
    monkeypatch.setattr(KernelDef, "run_kernel", kernel_of(wrong_variant=True))
    why = make("variant_wrong")._check("cuda")
    assert why == "variant_wrong cuda kernel is not bitwise equal to the reference on its variant's example"
    assert make("variant_elsewhere")._check("metal") == ""
    on["variant"] = False
    assert make("variant_off")._check("cuda") == ""
