"""One rank of a two-process run: test_sharded.py's over MLX's ring backend on the CPU (the
launcher sets MLX_RANK and MLX_HOSTFILE), test_sharded_nccl.py's over NCCL on two GPUs
(NCCL_HOST_IP, NCCL_PORT, MLX_WORLD_SIZE, MLX_RANK, one CUDA_VISIBLE_DEVICES each).
Usage: worker.py [--backend ring|nccl] OUT.json MODE CKPT [CKPT ...], MODE one of tensor,
pipeline.

ring runs in float32 (MLX's CPU gather_mm takes float32) and all-sums its check on the CPU
stream; nccl compares the patched and stock sharded models in the model's own dtype (bf16
activations: what the patterns' CUDA kernels run) and the stock sharded model with the
unsharded one in float32 (as ring does: in bf16 a tensor-parallel all-sum's other order
flips tokens of the random tiny models), and all-sums on the GPU (NCCL has no CPU stream).

For each checkpoint it decodes greedily with the unsharded stock model, the sharded stock
model (mlx-lm's sharded_load: `shard()` or `pipeline()`) and the sharded model patched with
each selection in SELECTIONS, and writes (rank 0) the tokens, whether the logits are
bitwise equal, and each pattern's report. Every rank checks its own tokens agree with rank
0's (they must: each rank samples from the same all-gathered or all-summed logits). Over NCCL
the stock sharded model is built from mlx-lm's own pieces (load_model, then `shard()` or
`pipeline()`), not sharded_load: mlx-lm 0.32.2's sharded_load ends with an all-sum on the CPU
stream, which NCCL cannot run.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load, load_model, sharded_load

import zmlx
from zmlx import distributed
from zmlx.distributed import ShardError
from zmlx.families import FAMILIES

# Patterns that replace the same method are split over selections, so each one is applied
# somewhere (the registry's first pattern wins where two are chosen together; the block
# patterns go around the module patterns at decode); mla_attention without compiled_decode,
# whose static cache would send it to mlx-lm's method.
SELECTIONS = (
    "moe_block,mla_block,compiled_decode",
    "moe_router,moe_combine,residual_norm,glm47_rope",
    "downproj_combine,moe_mlp,swiglu_mlp,mla_attention",
    "mla_kv_quant",
    "mla_prologue,moe_block",  # the CUDA default's attention and MoE halves at decode
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


def cuda_preset(model_type: str) -> str:
    """The family's default preset on CUDA as one selection (its patterns are exact there)."""
    return ",".join(FAMILIES[model_type].preset_on("cuda"))


def bitwise(a: list[mx.array], b: list[mx.array]) -> bool:
    return all(mx.array_equal(x, y).item() for x, y in zip(a, b))


def stock_sharded(path: str, mode: str, group, backend: str):
    """mlx-lm's model split over `group` as `mode` says: sharded_load over ring; over NCCL
    load_model, then `shard()` or `pipeline()` (sharded_load's closing all-sum runs on the CPU
    stream, which NCCL cannot run)."""
    if backend != "nccl":
        kw = {"tensor_group": group} if mode == "tensor" else {"pipeline_group": group}
        return sharded_load(path, **kw)[0]
    model, _ = load_model(Path(path), lazy=True, strict=False)
    model.shard(group) if mode == "tensor" else model.model.pipeline(group)
    mx.eval(model.parameters())
    return model


def run(path: str, mode: str, group, backend: str = "ring") -> dict:
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    unquantized = not config.get("quantization")
    selections = SELECTIONS
    if backend == "nccl":  # and the family's CUDA preset, whose patterns are exact there
        selections += (cuda_preset(config["model_type"]),)

    def float32(model):
        # MLX's CPU gather_mm takes float32, and in bf16 the tensor-parallel all-sum's other
        # order flips tokens of the random tiny models; a pipeline computes what the unsharded
        # model does, and stock mlx-lm gives NaN for a pipelined mxfp4 model cast to float32
        # (nccl runs the bf16 checkpoints only: their reference pair is always float32)
        if unquantized or mode == "tensor":
            model.set_dtype(mx.float32)
        return model

    ref_tokens, ref_logits = greedy(float32(load(path)[0]))
    model = float32(stock_sharded(path, mode, group, backend))
    tokens, logits = greedy(model)
    out: dict = {
        "unsharded": ref_tokens,
        "sharded": tokens,
        "sharded_bitwise_unsharded": bitwise(ref_logits, logits),
        "patched": {},
    }
    if backend == "nccl":  # the patterns against the stock sharded model in its own dtype
        model = stock_sharded(path, mode, group, backend)
        tokens, logits = greedy(model)
        out["native"] = tokens
    for selection in selections:
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
    mine = mx.array(
        out["sharded"] + out.get("native", []) + [t for s in out["patched"].values() for t in s["tokens"]]
    )
    stream = mx.cpu if backend == "ring" else mx.gpu
    same = mx.distributed.all_sum(mine, group=group, stream=stream) == mine * group.size()
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("ring", "nccl"), default="ring")
    parser.add_argument("out")
    parser.add_argument("mode", choices=("tensor", "pipeline"))
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    group = mx.distributed.init(backend=args.backend, strict=True)
    results = {path: run(path, args.mode, group, args.backend) for path in args.paths}
    load = loads(args.paths[0], args.mode, group)
    if group.rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"size": group.size(), "backend": args.backend, "results": results, "load": load}, f)


if __name__ == "__main__":
    main()
