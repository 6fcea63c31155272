"""The `-calm` synthetic presets: the residual writers' gain at 0.1, the rest as the plain
preset's, and a bf16 run that stays nearer its float32 model than the plain preset's."""

import mlx.core as mx
import pytest

from zmlx import synth
from zmlx.accuracy import Divergences, log_probs, reference_model
from zmlx.fidelity import teacher_forced_logits
from zmlx.synth_families import glm4_moe_lite as gen
from zmlx.synth_presets import GLM4_MOE_LITE_PRESETS as PRESETS


def test_every_shape_has_a_calm_preset_with_only_the_gain_added():
    plain = [p for p in PRESETS if not p.endswith("-calm")]
    assert {"flash", "tiny", "tiny-deep"} <= set(plain)
    for p in plain:
        assert PRESETS[f"{p}-calm"] == dict(PRESETS[p], zmlx_residual_gain=0.1)
    assert PRESETS["tiny-deep"]["num_hidden_layers"] == 47


def test_only_the_residual_writers_are_scaled():
    cfg = {**synth.GLM4_MOE_LITE_COMMON, **PRESETS["tiny"]}
    plain = gen.hub_layer_weights(0, cfg, 1)
    calm = gen.hub_layer_weights(0, dict(cfg, zmlx_residual_gain=0.1), 1)
    assert plain.keys() == calm.keys()
    writers = [k for k in plain if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(writers) == 2 + cfg["n_routed_experts"]  # o_proj, shared and routed down_proj
    for k, v in plain.items():
        if k in writers:
            ratio = calm[k].astype(mx.float32) / mx.where(v == 0, 1, v).astype(mx.float32)
            assert mx.allclose(mx.where(v == 0, 0.1, ratio), mx.array(0.1), rtol=2**-6).item(), k
        else:
            assert mx.array_equal(plain[k], calm[k]).item(), k


def _kld(preset: str) -> float:
    model, _ = synth.build(f"synth:glm4_moe_lite/{preset}/affine4")
    prompt, tokens = mx.array([3, 14, 15, 92, 65, 35, 89, 79]), list(range(100, 132))
    lp_ref = log_probs(list(teacher_forced_logits(reference_model(model), prompt, tokens)))
    lp = log_probs(list(teacher_forced_logits(model, prompt, tokens)))
    return Divergences.between(lp_ref, lp).kld_mean


@pytest.mark.parametrize("preset", ["tiny"])
def test_a_calm_model_stays_nearer_its_float32_model(preset):
    plain, calm = _kld(preset), _kld(f"{preset}-calm")
    assert calm < plain / 4, (plain, calm)
