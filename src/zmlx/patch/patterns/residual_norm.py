"""residual_norm: each residual add fused with the RMSNorm that reads it, across layers.

Stock, per decoder layer: input_layernorm(x); h = x + attn; post_attention_layernorm(h);
out = h + mlp; and the next layer (or the final norm) normalizes `out` again. The
patched model loop carries the residual stream itself and calls the `residual_norm`
kernel at every add: 2 launches fewer per layer. It calls each layer's own attention,
MLP and norm weights (so the attention and MoE patterns still apply inside), and
falls back to mlx-lm's loop for pipeline-parallel runs. Its loop never calls a decoder
layer's `__call__`, so it yields to moe_block, mla_block and mla_prologue (which patch that method;
moe_block fuses these adds into its own launches): with one of them chosen, it applies and
residual_norm is skipped, and the report says why.
"""

from __future__ import annotations

from functools import cache

from mlx_lm.models.base import create_attention_mask

from zmlx.kernels.residual_norm import residual_norm
from zmlx.patch.pattern import Pattern


def check(model, params) -> str | None:
    if getattr(model, "pipeline_size", 1) != 1:
        return "pipeline-parallel model (the stock loop sends activations between ranks)"
    layers = getattr(model, "layers", None)
    if not layers:
        return "model has no layers"
    layer_cls = type(layers[0])
    if any(type(layer) is not layer_cls for layer in layers):
        return "decoder layers of more than one class"
    for attr in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(layers[0], attr):
            return f"decoder layer has no {attr}"
    return None


@cache
def make():
    def __call__(self, x, cache=None):
        if self.pipeline_size != 1:  # pipelined after patching: mlx-lm's own loop
            return type(self).__zmlx_original__.__call__(self, x, cache)
        h = self.embed_tokens(x)
        layers = self.pipeline_layers
        if cache is None:
            cache = [None] * len(layers)
        mask = create_attention_mask(h, cache[0], return_array=True)
        xn = layers[0].input_layernorm(h)
        for i, (layer, c) in enumerate(zip(layers, cache)):
            r = layer.self_attn(xn, mask, c)
            norm = layer.post_attention_layernorm
            h, xn = residual_norm(h, r, norm.weight, norm.eps)
            r = layer.mlp(xn)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h, xn = residual_norm(h, r, norm.weight, norm.eps)
        return xn

    return __call__


PATTERN = Pattern(
    name="residual_norm",
    summary="decoder residual add + the RMSNorm after it (both outputs), across layers",
    fidelity="exact",
    kernels=(residual_norm,),
    check=check,
    make=make,
    yields_to=("moe_block", "mla_block", "mla_prologue", "gqa_prologue"),
)
