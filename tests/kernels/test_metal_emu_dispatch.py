"""metal_emu.emulated(): every KernelDef dispatches as on Metal, its launches through the
emulation, and nothing of it outlives the context."""

import dataclasses

import mlx.core as mx
import pytest

import zmlx
from zmlx import backend
from zmlx.accuracy import accuracy
from zmlx.fidelity import greedy_logits
from zmlx.kernels import core, metal_emu, prepared
from zmlx.kernels.downproj_combine import downproj_combine
from zmlx.kernels.metal_emu import dispatch
from zmlx.kernels.moe_combine import moe_combine
from zmlx.kernels.moe_mlp import moe_mlp

pytestmark = pytest.mark.skipif(
    not metal_emu.available(), reason="g++ not found: the Metal emulation needs it"
)


def _same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(a) == len(b) and all(x.dtype == y.dtype and mx.array_equal(x, y).item() for x, y in zip(a, b))


@pytest.mark.parametrize("kernel", [moe_mlp, downproj_combine, moe_combine], ids=lambda k: k.name)
def test_a_call_inside_is_the_emulated_metal_body(tmp_path, kernel):
    args, kwargs = kernel.example()
    want = metal_emu.run(kernel, *args, workdir=tmp_path, **kwargs)
    with metal_emu.emulated() as emulation:
        assert backend.current() == "metal"
        got = kernel(*args, **kwargs)  # self-check on the example first, then the launch
        assert kernel.plan() == ("metal", "kernel", "")
        # the self-check's launch and the call's: the same executable, built once
        assert emulation.launches == 2 and len(emulation.exes) == 1
    assert _same(got, want)


def test_a_prepared_launch_inside_is_the_emulated_body_and_refuses_to_run_after(tmp_path):
    args, kwargs = moe_combine.example()
    want = metal_emu.run(moe_combine, *args, workdir=tmp_path, **kwargs)
    with metal_emu.emulated():
        launch = prepared.prepare(moe_combine, args, kwargs, live=(0,))
        assert launch.path == "kernel"
        assert _same(launch(args[0]), want)
    with pytest.raises(metal_emu.EmulationError, match="called after it"):
        launch(args[0])


def test_the_context_restores_the_backend_builders_and_statuses():
    args, kwargs = moe_combine.example()
    build, device = core.build, backend.device_name()
    stale = dataclasses.replace(moe_combine, name="stale_probe", _status={"metal": "No Metal back-end"})
    fresh = dataclasses.replace(moe_combine, name="fresh_probe", _status={})
    with pytest.raises(KeyError):  # an error inside leaves nothing behind either
        with metal_emu.emulated():
            assert backend.recorded() == "metal-emulated"
            assert backend.device_name().startswith("metal-emulated on cpu")
            assert stale.plan() == fresh.plan() == ("metal", "kernel", "")  # checked afresh inside
            assert core.build is not build
            raise KeyError("inside")
    assert backend.current() == backend.recorded() == "cpu" and backend.emulated() is None
    assert backend.device_name() == device and core.build is build
    assert stale._status == {"metal": "No Metal back-end"} and fresh._status == {}
    assert moe_combine.plan() == ("cpu", "reference", "custom kernels do not run on MLX's CPU backend")
    assert _same(moe_combine(*args, **kwargs), moe_combine.reference(*args, **kwargs))


def test_it_is_refused_where_it_cannot_run(monkeypatch):
    with metal_emu.emulated():
        with pytest.raises(metal_emu.EmulationError, match="already running"):
            with metal_emu.emulated():
                pass
    monkeypatch.setattr(dispatch._backend, "current", lambda: "cuda")
    with pytest.raises(metal_emu.EmulationError, match=r"MLX's CPU backend \(this is cuda\)"):
        with metal_emu.emulated():
            pass
    monkeypatch.undo()
    monkeypatch.setattr(metal_emu, "available", lambda: False)
    with pytest.raises(metal_emu.EmulationError, match="needs g"):
        with metal_emu.emulated():
            pass
    assert backend.emulated() is None


@pytest.fixture(scope="module")
def tiny():
    from zmlx import synth

    return synth.build("synth:glm4_moe_lite/tiny/affine4")[0]


def test_a_patched_model_runs_the_metal_bodies_and_the_rule_judges_them(tiny):
    """The tiny model patched inside: the close kernels run (their outputs differ from stock's
    references, which the CPU runs outside), and the accuracy rule compares them to the truth."""
    prompt = mx.array([[300, 301, 302, 303, 304, 305]])
    stock = greedy_logits(tiny, prompt, 3)
    tokens = [int(mx.argmax(lg[0, -1]).item()) for lg in stock[:3]]
    with metal_emu.emulated() as emulation:
        result = zmlx.patch(tiny, "moe_mlp,downproj_combine")
        assert {n: (r.backend, r.path) for n, r in result.patterns.items()} == {
            "moe_mlp": ("metal", "kernel"),
            "downproj_combine": ("metal", "kernel"),
        }
        patched = greedy_logits(tiny, prompt, 3)
        zmlx.unpatch(tiny)
        assert emulation.launches > 0
        acc = accuracy(tiny, prompt[0], tokens, patterns="moe_mlp,downproj_combine")
    assert not _same(patched[-1], stock[-1])  # decode steps ran the Metal bodies
    assert _same(patched[0], stock[0])  # the prompt runs mlx-lm's path
    assert acc.stock_patched.kld_mean > 0 and acc.ref_patched.positions == 3
    assert acc.ref_patched.kld_mean <= 1.1 * acc.ref_stock.kld_mean + 1e-6, acc.to_dict()
