"""Where a patched model's numbers leave stock's, layer by layer, over a few decode steps.
Two copies of the model (one patched) prefill the same prompt, then decode the same
tokens (stock's greedy choices, teacher-forced) through each decoder layer in turn:

- `local`: relative error (||patched - stock|| / ||stock||) of the layer's MLP/MoE block
  when both get stock's input: the error that layer's kernels add by themselves;
- `carried`: relative error of the hidden state after the layer, each model on its own
  inputs: the error accumulated up to there;
- `routes`: how many routed experts differ between the two models' own routings (a
  flipped expert changes a layer's output by far more than rounding does);
- per step: whether the argmax agrees, max |Δlogit|, and stock's top-1 - top-2 margin.

A correct `close` kernel shows local errors of a few bf16 roundings (2**-8 = 0.0039);
a wrong one shows local errors of order 1. When local errors are small but carried
errors grow to order 1 through expert flips, the model amplifies rounding: token
identity then says more about the model than about the kernel.

The layer loop is the common mlx-lm decoder layer (input_layernorm, self_attn,
post_attention_layernorm, mlp), run here rather than through the model's own loop, so
patterns that replace the model loop itself (residual_norm) are not exercised.

The command: `python -m zmlx.bench.drift MODEL --patterns P[,Q]` (zmlx.cli.drift).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import mlx.core as mx

from zmlx.fidelity import scalar


@dataclass
class LayerDrift:
    layer: int
    local: list[float] = field(default_factory=list)  # per step
    carried: list[float] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)  # differing experts per step (MoE layers)


@dataclass
class StepDrift:
    token: int
    argmax_equal: bool
    max_abs_dlogit: float
    stock_margin: float


@dataclass
class Drift:
    layers: list[LayerDrift]
    steps: list[StepDrift]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(x) for x in self.layers], "steps": [asdict(s) for s in self.steps]}


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    den = scalar(mx.sqrt(mx.sum(b * b)))
    return scalar(mx.sqrt(mx.sum((a - b) ** 2))) / den if den > 0 else float(scalar(mx.any(a != b)))


def _noisy(m: mx.array, eps: float, key) -> mx.array:
    if eps == 0:
        return m
    return (m.astype(mx.float32) * (1 + eps * mx.random.normal(m.shape, key=key))).astype(m.dtype)


def _experts(mlp, x) -> set[int] | None:
    gate = getattr(mlp, "gate", None)
    if gate is None:
        return None
    inds, _ = gate(x)
    return set(inds.reshape(-1).tolist())


def _logits(model, h):
    h = model.model.norm(h)
    head = getattr(model, "lm_head", None)
    return head(h) if head is not None else model.model.embed_tokens.as_linear(h)


def drift(
    stock,
    patched,
    prompt: list[int],
    steps: int = 8,
    perturb: float = 0.0,
    on_step: Callable[[int], None] | None = None,
) -> Drift:
    """Layer-by-layer drift of `patched` from `stock` (two copies of one model) over
    `steps` teacher-forced decode steps after prefilling `prompt`. `perturb` > 0 multiplies
    each of the patched copy's MLP outputs by (1 + perturb * N(0, 1)) (seeded): a stand-in
    for a kernel with errors of that relative size, to see how far the model carries them."""
    from mlx_lm.models.cache import make_prompt_cache

    if len(prompt) < 2:
        raise ValueError("the prompt needs at least 2 tokens")
    if not (math.isfinite(perturb) and perturb >= 0):
        raise ValueError(f"perturb {perturb}: a finite relative size >= 0")
    caches = make_prompt_cache(stock), make_prompt_cache(patched)
    ids = mx.array(prompt[:-1])[None]
    mx.eval(stock(ids, cache=caches[0]), patched(ids, cache=caches[1]))
    layers_s, layers_p = stock.model.layers, patched.model.layers
    out = Drift(layers=[LayerDrift(i) for i in range(len(layers_s))], steps=[])
    token = prompt[-1]
    key = mx.random.key(0)
    for step in range(steps):
        h_s = h_p = stock.model.embed_tokens(mx.array([[token]]))
        for i, (ls, lp) in enumerate(zip(layers_s, layers_p)):
            h1_s = h_s + ls.self_attn(ls.input_layernorm(h_s), None, caches[0][i])
            h1_p = h_p + lp.self_attn(lp.input_layernorm(h_p), None, caches[1][i])
            x_s, x_p = ls.post_attention_layernorm(h1_s), lp.post_attention_layernorm(h1_p)
            m_s = ls.mlp(x_s)
            local = _noisy(lp.mlp(x_s), perturb, key)  # the patched block on stock's input
            h_s, h_p = h1_s + m_s, h1_p + _noisy(lp.mlp(x_p), perturb, key)
            key = mx.random.split(key)[0]
            mx.eval(h_s, h_p, local)
            d = out.layers[i]
            d.local.append(_rel(local, m_s))
            d.carried.append(_rel(h_p, h_s))
            e_s, e_p = _experts(ls.mlp, x_s), _experts(lp.mlp, x_p)
            if e_s is not None and e_p is not None:
                d.routes.append(len(e_s - e_p))
        lg_s = _logits(stock, h_s)[0, -1].astype(mx.float32)
        lg_p = _logits(patched, h_p)[0, -1].astype(mx.float32)
        top2 = mx.sort(lg_s)[-2:]
        nxt = int(scalar(mx.argmax(lg_s)))
        out.steps.append(
            StepDrift(
                token=nxt,
                argmax_equal=nxt == int(scalar(mx.argmax(lg_p))),
                max_abs_dlogit=scalar(mx.max(mx.abs(lg_s - lg_p))),
                stock_margin=scalar(top2[1] - top2[0]),
            )
        )
        token = nxt
        if on_step:
            on_step(step)
    return out


if __name__ == "__main__":  # python -m zmlx.bench.drift: the `zmlx drift` command
    from zmlx.cli.drift import main

    main()
