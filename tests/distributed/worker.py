"""One rank of test_sharded.py's two-process run (MLX's ring backend; the launcher sets
MLX_RANK and MLX_HOSTFILE). Usage: worker.py OUT.json MODE CKPT [CKPT ...], MODE one of
tensor, pipeline.

For each checkpoint it decodes greedily with the unsharded stock model, the sharded stock
model (mlx-lm's sharded_load: `shard()` or `pipeline()`) and the sharded model patched with
each selection in SELECTIONS, and writes (rank 0) the tokens, whether the logits are
bitwise equal, and each pattern's report. Every rank checks its own tokens agree with rank
0's (they must: each rank samples from the same all-gathered or all-summed logits).
"""

from __future__ import annotations

import copy
import json
import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load, sharded_load

import zmlx
from zmlx import distributed
from zmlx.distributed import ShardError

# Patterns that replace the same method are split over selections, so each one is applied
# somewhere (the registry's first pattern wins where two are chosen together; the block
# patterns go around the module patterns at decode); mla_attention without compiled_decode,
# whose static cache would send it to mlx-lm's method.
SELECTIONS = (
    "moe_block,mla_block,compiled_decode",
    "moe_router,moe_combine,residual_norm,glm47_rope",
    "downproj_combine,moe_mlp,swiglu_mlp,mla_attention",
    "mla_kv_quant",
)
PROMPT = [[5, 17, 33, 71, 200, 9, 1021, 4]]
STEPS = 5


def greedy(model) -> tuple[list[int], list[mx.array]]:
    """The prompt's and STEPS greedy steps' last logits, each step evaluated before the next
    (a pipeline's send / recv pairs must run in step order on every rank)."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(PROMPT), cache=cache)[:, -1]
    mx.eval(logits)
    outs = [logits]
    for _ in range(STEPS):
        logits = model(mx.argmax(logits, axis=-1, keepdims=True), cache=cache)[:, -1]
        mx.eval(logits)
        outs.append(logits)
    return [int(mx.argmax(o[0]).item()) for o in outs], outs


def bitwise(a: list[mx.array], b: list[mx.array]) -> bool:
    return all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def run(path: str, mode: str, group) -> dict:
    with open(f"{path}/config.json") as f:
        unquantized = not json.load(f).get("quantization")

    def float32(model):
        # MLX's CPU gather_mm takes float32, and in bf16 the tensor-parallel all-sum's other
        # order flips tokens of the random tiny models; a pipeline computes what the unsharded
        # model does, and stock mlx-lm gives NaN for a pipelined mxfp4 model cast to float32
        if unquantized or mode == "tensor":
            model.set_dtype(mx.float32)
        return model

    ref_tokens, ref_logits = greedy(float32(load(path)[0]))
    kw = {"tensor_group": group} if mode == "tensor" else {"pipeline_group": group}
    model = float32(sharded_load(path, **kw)[0])
    tokens, logits = greedy(model)
    out: dict = {
        "unsharded": ref_tokens,
        "sharded": tokens,
        "sharded_bitwise_unsharded": bitwise(ref_logits, logits),
        "patched": {},
    }
    for selection in SELECTIONS:
        result = zmlx.patch(model, patterns=selection)
        refused = None  # nothing patched: the model is stock, and sharding it again is mlx-lm's business
        if any(r.patched for r in result.patterns.values()):
            try:
                model.shard(group) if mode == "tensor" else model.model.pipeline(group)
                refused = ""  # a defect: the model is now sharded twice
            except ShardError as e:
                refused = str(e)
        p_tokens, p_logits = greedy(model)
        out["patched"][selection] = {
            "tokens": p_tokens,
            "bitwise": bitwise(logits, p_logits),
            "exact": all(r.fidelity == "exact" for r in result.patterns.values() if r.patched),
            "refused": refused,
            "patterns": {
                n: {"patched": len(r.patched), "skipped": sorted({w for _, w in r.skipped})}
                for n, r in result.patterns.items()
            },
        }
        zmlx.unpatch(model)
    # every rank must have decoded the same tokens
    mine = mx.array(tokens + [t for s in out["patched"].values() for t in s["tokens"]])
    same = mx.distributed.all_sum(mine, group=group, stream=mx.cpu) == mine * group.size()
    out["ranks_agree"] = bool(same.all().item())
    return out


def loads(path: str, mode: str, group) -> dict:
    """zmlx.distributed's loader (what the CLIs call under mlx.launch): a checkpoint and the
    same model as a synth spec, split as `mode` says, and an affine4 spec it refuses."""
    pipeline = mode == "pipeline"
    out = {"world": distributed.world().size(), "primary": distributed.primary(group)}
    for name in (path, "synth:glm4_moe_lite/tiny/bf16"):
        model, _, source = distributed.load(name, group, pipeline=pipeline)
        model.set_dtype(mx.float32)
        out[source.kind] = greedy(model)[0]
    # zmlx.accuracy's reference is a deep copy: the groups stay shared (a Group cannot be copied)
    out["copy"] = greedy(copy.deepcopy(model, distributed.groups_memo(model)))[0]
    try:
        distributed.load("synth:glm4_moe_lite/tiny/affine4", group, pipeline=pipeline)
        out["refused"] = ""
    except ShardError as e:
        out["refused"] = str(e)
    return out


def main() -> None:
    out_path, mode, *paths = sys.argv[1:]
    group = mx.distributed.init(backend="ring", strict=True)
    results = {path: run(path, mode, group) for path in paths}
    load = loads(paths[0], mode, group)
    if group.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"size": group.size(), "results": results, "load": load}, f)


if __name__ == "__main__":
    main()
