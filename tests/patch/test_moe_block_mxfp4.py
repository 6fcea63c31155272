"""moe_block on an mxfp4 model (zmlx.synth's tiny GLM-4.7-Flash quantized with mode="mxfp4":
experts, shared experts and the dense layer alike). On the CPU the launches run their
references, which must be mlx-lm's own layers bitwise; on CUDA the kernels, bitwise too."""

import mlx.core as mx
import pytest
from block_helpers import check_moe_block_is_bitwise_mlx_lm_on_the_cpu, patched_run, same

from zmlx import backend, synth
from zmlx.fidelity import greedy_logits
from zmlx.patch.patterns import moe_block

pytestmark = pytest.mark.usefixtures("blocks_on_the_cpu")


def _tiny_mxfp4():
    model, _ = synth.build("synth:glm4_moe_lite/tiny/mxfp4")
    if backend.current() != "cpu":  # as conftest's tiny_q4: stock must run the tiny model reliably
        probe = mx.arange(1, 17)[None]
        a, b = model(probe), model(probe)
        mx.eval(a, b)
        if not (mx.isfinite(a).all().item() and mx.array_equal(a, b).item()):
            pytest.skip(f"stock mlx on {backend.current()} gives non-finite or non-repeatable logits")
    return model


@pytest.mark.parametrize("batch", [1, 2])
def test_moe_block_takes_mxfp4_layers_bitwise_mlx_lm(batch):
    model = _tiny_mxfp4()
    assert model.model.layers[1].mlp.switch_mlp.gate_proj.mode == "mxfp4"
    assert model.model.layers[1].mlp.shared_experts.down_proj.mode == "mxfp4"
    check_moe_block_is_bitwise_mlx_lm_on_the_cpu(model, batch)


@pytest.mark.cuda
def test_on_the_gpu_every_mxfp4_layer_runs_its_kernels_bitwise_mlx_lm():
    """One sequence (the kernels' regime on CUDA): each layer's three launches are the fused
    kernels with mxfp4 weights, and the tokens and logits are stock's."""
    mx.set_default_device(mx.gpu)  # blocks_on_the_cpu puts the CPU back afterwards
    model = _tiny_mxfp4()
    prompt = mx.array([[3, 14, 15, 92, 65]])
    stock = greedy_logits(model, prompt, 4)
    result, patched, plans = patched_run(moe_block, model, prompt, 4)
    assert result.patterns["moe_block"].path == "kernel", result.patterns["moe_block"].fallbacks
    assert all(list(p.values()) and all(v.startswith("kernel: ") for v in p.values()) for p in plans), plans
    moe = "kernel: norm_router_gates, moe_gate_up_route, moe_down"  # the routing in launch 2
    assert all(list(p.values()) == [moe] for p in plans[1:]), plans
    assert same(stock, patched)
