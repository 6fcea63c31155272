import mlx.core as mx
import pytest

from zmlx import backend, synth

pytest_plugins = ("pytester",)  # tests/test_toolchains.py runs pytest on small test files

# Words in the skip reason of a test that needs a compiler of this machine (g++ for the Metal
# emulation, NVRTC for the CUDA compile check) or a download from the package index (mlx-lm's
# sdist, for its own model tests). --require-toolchains turns those skips into failures, so
# that CI cannot pass with those checks silently not run.
TOOLCHAIN_SKIPS = ("g++", "NVRTC", "mlx-lm's sdist")


def pytest_addoption(parser):
    parser.addoption(
        "--require-toolchains",
        action="store_true",
        help="fail, instead of skipping, a test whose compiler (g++, NVRTC) is missing (CI)",
    )
    parser.addoption(
        "--failures-at-once",
        action="store_true",
        help="print a failure's traceback when the test fails, not at the end (GPU runs a time "
        "limit may cut: benchmarks/gpu/run_glm47_flash.sh)",
    )


class _FailuresAtOnce:
    """--failures-at-once: the failure's text goes out as soon as its report arrives (with
    pytest-xdist, in the controller), so a run killed by a time limit still says why."""

    def __init__(self, config):
        self.config = config

    def pytest_runtest_logreport(self, report):
        writer = self.config.pluginmanager.get_plugin("terminalreporter")
        if report.failed and writer is not None:
            writer.write_line(f"\n== at once, why {report.nodeid} failed ({report.when}):")
            writer.write_line(report.longreprtext[-4000:])


def pytest_configure(config):
    if config.getoption("--failures-at-once"):
        config.pluginmanager.register(_FailuresAtOnce(config), "failures-at-once")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not (report.skipped and item.config.getoption("--require-toolchains")) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if any(word in reason for word in TOOLCHAIN_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"--require-toolchains: this test was skipped for a missing compiler ({reason})"


def pytest_collection_modifyitems(config, items):
    here = backend.current()
    for item in items:
        for marker in ("cuda", "metal"):
            if marker in item.keywords and here != marker:
                item.add_marker(pytest.mark.skip(reason=f"needs MLX's {marker} backend (this is {here})"))


@pytest.fixture(scope="session")
def tiny_q4():
    """Tiny GLM-4.7-Flash, affine 4-bit, bf16 activations (as users run it).

    Skipped where stock MLX itself cannot run it: on the H100/H200 (mlx 0.32.4, CUDA) the
    stock forward of this tiny config gives NaN at 16 tokens and different logits for the
    same prompt run twice (benchmarks/gpu/diagnose_tiny.py), so stock-vs-patched
    comparisons there would test MLX, not zmlx. The probe runs stock twice; once MLX runs
    it reliably the tests run again."""
    model, tok = synth.build("synth:glm4_moe_lite/tiny/affine4")
    if backend.current() != "cpu":
        probe = mx.arange(1, 17)[None]
        a, b = model(probe), model(probe)
        mx.eval(a, b)
        if not (mx.isfinite(a).all().item() and mx.array_equal(a, b).item()):
            pytest.skip(
                f"stock mlx on {backend.current()} gives non-finite or non-repeatable logits for "
                "the tiny affine4 model (see benchmarks/gpu/diagnose_tiny.py)"
            )
    return model, tok


@pytest.fixture(scope="session")
def tiny_f32():
    """Tiny GLM-4.7-Flash, unquantized, cast to float32 (MLX's CPU gather_mm needs float32)."""
    model, tok = synth.build("synth:glm4_moe_lite/tiny/bf16")
    model.set_dtype(mx.float32)
    return model, tok


@pytest.fixture(scope="session")
def decode_steps():
    """steps(model, prompt, n) -> the logits of a prompt (with mlx-lm's prompt cache) and n
    greedy decode steps after it, evaluated."""
    from zmlx.fidelity import greedy_logits

    return greedy_logits


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """A tiny llama checkpoint (a family zmlx has no patterns for), written offline."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from zmlx import synth

    out = tmp_path_factory.mktemp("llama")
    cfg = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=300,
        eos_token_id=synth.EOS_ID,
    )
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    synth.write_tokenizer(out, cfg["vocab_size"])
    return out


def _close_bar(reference, reference_f32, args, kw, dtype):
    import mlx.core as mx

    want = reference_f32(*args, **kw)
    stock_err = mx.abs(reference(*args, **kw).astype(mx.float32) - want).max().item()
    ulp = {mx.bfloat16: 2**-8, mx.float16: 2**-11, mx.float32: 2**-18}[dtype]
    return want, 2 * stock_err + ulp * mx.abs(want).max().item()


@pytest.fixture
def qmm_on(monkeypatch):
    """quant.QMM_ORDER, QMM_DOWN, QMM_PIPELINED and QMM_BLOCK on (the kernels in qmm_sm80's
    order, their newest bodies, moe_block's launches too), whatever their defaults."""
    from zmlx.kernels import quant

    monkeypatch.setattr(quant, "QMM_ORDER", True)
    monkeypatch.setattr(quant, "QMM_DOWN", True)
    monkeypatch.setattr(quant, "QMM_PIPELINED", True)
    monkeypatch.setattr(quant, "QMM_BLOCK", True)


@pytest.fixture
def close_bar():
    """close_bar(reference, reference_f32, args, kw, dtype) -> (float32 truth, tolerance) for a
    `close` kernel: 2x stock's largest error against float32, plus one rounding of dtype at the
    output's size (for float32: the reordering of a D-term float32 sum, 2**-18 of the largest
    output)."""
    return _close_bar
