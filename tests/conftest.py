import mlx.core as mx
import pytest

from zmlx import backend, synth


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
            pytest.skip(f"stock mlx on {backend.current()} gives non-finite or non-repeatable logits for "
                        "the tiny affine4 model (see benchmarks/gpu/diagnose_tiny.py)")
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
    from zmlx.validate import greedy_logits

    return greedy_logits
