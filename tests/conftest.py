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
    """Tiny GLM-4.7-Flash, affine 4-bit, bf16 activations (as users run it)."""
    return synth.build("synth:glm4_moe_lite/tiny/affine4")


@pytest.fixture(scope="session")
def tiny_f32():
    """Tiny GLM-4.7-Flash, unquantized, cast to float32 (MLX's CPU gather_mm needs float32)."""
    model, tok = synth.build("synth:glm4_moe_lite/tiny/bf16")
    model.set_dtype(mx.float32)
    return model, tok
