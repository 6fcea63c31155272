"""zmlx with mlx-lm's sharded models (mx.distributed: ring, JACCL, MPI, NCCL).

mlx-lm splits a model over a group of processes in two ways, and zmlx patches the result:

- tensor parallel, `model.shard(group)`: each attention keeps `num_heads / N` heads (q_b_proj
  an AllToShardedLinear, embed_q / unembed_out sliced by head, o_proj a ShardedToAllLinear
  that all-sums), a dense MLP's projections become sharded linears, and each MoE block keeps
  every expert with 1/N of its intermediate width (shard_inplace) and all-sums its output
  (routed combine plus shared expert) itself, once, before the decoder layer's residual add.
- pipeline parallel, `model.model.pipeline(group)`: each process runs a slice of the layers.

The rule is: shard (or pipeline) first, then patch. A pattern either computes the sharded
shapes (it reads the heads and widths from the sharded modules, and leaves every all-sum
where mlx-lm puts it: moe_combine and downproj_combine all-sum after the combine, moe_block's
moe_down adds a zero residual and the layer adds h after the all-sum; mla_block reads an
all-to-sharded q_b_proj as the linear of this process's heads) or skips with its reason
(`sharded_linear_reason`: the dense layer's sharded MLP). Sharding a model
that is patched would leave the patches planned for the whole model's shapes, so `patch`
replaces the model's `shard` and its inner model's `pipeline` with `Refuse`, which raises one
line; `unpatch` removes them.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = [
    "ORDER",
    "Refuse",
    "ShardError",
    "check_shardable",
    "groups_memo",
    "guard",
    "load",
    "moe_sharded",
    "primary",
    "release",
    "row_sharded_reason",
    "shard_reason",
    "sharded_linear_reason",
    "world",
]

ORDER = "unpatch, shard, then patch: zmlx.unpatch(model); model.shard(group); zmlx.patch(model)"


class ShardError(ValueError):
    """A model that cannot be sharded as asked; the message is one line that says why."""


def _sharded_types() -> tuple[type, ...]:
    from mlx.nn.layers import distributed as d

    return (
        d.AllToShardedLinear,
        d.ShardedToAllLinear,
        d.QuantizedAllToShardedLinear,
        d.QuantizedShardedToAllLinear,
    )


def sharded_linear_reason(name: str, proj) -> str | None:
    """Why a pattern that reads `proj`'s weights as one whole linear skips it: it is one of
    mlx-lm's tensor-parallel linears (a slice of the rows or columns, and for sharded-to-all
    an all-sum inside its call); None otherwise."""
    if isinstance(proj, _sharded_types()):
        return (
            f"tensor-parallel model: {name} is a {type(proj).__name__} (mlx-lm's shard()); "
            "this pattern's kernels read whole linears"
        )
    return None


def row_sharded_reason(name: str, proj) -> str | None:
    """For a pattern that reads `proj` through zmlx.kernels.quant.weights_of: None where it
    is a plain linear or mlx-lm's all-to-sharded one (its call is the plain product over its
    slice of the output rows: the same kernel inputs, fewer rows), else why not."""
    from mlx.nn.layers import distributed as d

    from zmlx.kernels.quant import dense_or_quantized, linear_reason

    if isinstance(proj, (d.AllToShardedLinear, d.QuantizedAllToShardedLinear)):
        return dense_or_quantized(name, proj, d.QuantizedAllToShardedLinear, d.AllToShardedLinear)
    return sharded_linear_reason(name, proj) or linear_reason(name, proj)


def moe_sharded(moe) -> bool:
    """Whether an MoE block is tensor-parallel (mlx-lm all-sums its output itself)."""
    return getattr(moe, "sharding_group", None) is not None


class Refuse:
    """Stands in for a patched model's `shard` / `pipeline` method: raises ShardError.
    A module-level class (not a closure), so a patched model still pickles."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any):
        raise ShardError(f"this model is patched by zmlx; {self.what} would not re-plan the patches: {ORDER}")


# (object holding the method, method name, what calling it does)
def _targets(model) -> list[tuple[Any, str, str]]:
    out = []
    if callable(getattr(model, "shard", None)):
        out.append((model, "shard", "shard()"))
    inner = getattr(model, "model", None)
    if inner is not None and callable(getattr(inner, "pipeline", None)):
        out.append((inner, "pipeline", "pipeline()"))
    return out


def guard(model) -> None:
    """Make `model.shard(...)` and `model.model.pipeline(...)` raise ShardError while the model
    is patched (instance attributes: mlx-lm's classes are untouched)."""
    for obj, name, what in _targets(model):
        if not isinstance(obj.__dict__.get(name), Refuse):
            object.__setattr__(obj, name, Refuse(what))


def release(model) -> None:
    """Undo `guard`: the model's own methods again."""
    for obj in (model, getattr(model, "model", None)):
        if obj is None or not hasattr(obj, "__dict__"):
            continue
        for name in ("shard", "pipeline"):
            if isinstance(obj.__dict__.get(name), Refuse):
                object.__delattr__(obj, name)


# ---------------------------------------------------------------- bad set-ups


def _widths(proj) -> tuple[int, int | None]:
    """(input width, quantization group size or None) of a linear or switch linear."""
    gs = getattr(proj, "group_size", None) if "scales" in proj else None
    cols = proj["weight"].shape[-1]
    if gs is not None:
        cols = cols * 32 // proj.bits
    return cols, gs


def shard_reason(model, size: int) -> str | None:
    """Why mlx-lm's tensor-parallel `model.shard(group)` cannot split `model` over `size`
    processes, as one line, or None. mlx-lm's shard() does not check the heads (it floors
    num_heads / N), and a width that does not split (into whole quantization groups, for
    quantized weights) raises from inside mlx.nn's shard_linear / shard_inplace (mx.split)."""
    if size < 1:
        return f"world size {size} is not positive"
    if not callable(getattr(model, "shard", None)):
        mt = getattr(model, "model_type", type(model).__name__)
        return f"model type {mt!r} has no tensor parallelism in mlx-lm (no shard() method)"
    if size == 1:
        return None
    for i, layer in enumerate(getattr(model, "layers", None) or ()):
        attn = getattr(layer, "self_attn", None)
        heads = getattr(attn, "num_heads", None)
        if heads is not None and heads % size:
            return f"layer {i}: {heads} attention heads do not split over {size} processes"
        mlp = getattr(layer, "mlp", None)
        parts = []
        if mlp is not None and hasattr(mlp, "switch_mlp"):
            parts.append(("experts' down_proj", mlp.switch_mlp.down_proj))
            if getattr(mlp, "shared_experts", None) is not None:
                parts.append(("shared expert's down_proj", mlp.shared_experts.down_proj))
        elif mlp is not None and hasattr(mlp, "down_proj"):
            parts.append(("MLP down_proj", mlp.down_proj))
        for name, proj in parts:
            if "weight" not in proj:
                continue
            cols, gs = _widths(proj)
            if cols % size:
                return f"layer {i}: {name} width {cols} does not split over {size} processes"
            if gs is not None and (cols // size) % gs:
                return (
                    f"layer {i}: {name} width {cols} over {size} processes is not whole quantization "
                    f"groups of {gs}"
                )
    return None


def check_shardable(model, size: int) -> None:
    """Raise ShardError with `shard_reason`'s line where the model cannot be sharded."""
    if (why := shard_reason(model, size)) is not None:
        raise ShardError(why)


# ---------------------------------------------------------------- the MoE's all-sum


def moe_input(moe, x):
    """mlx-lm's tensor-parallel MoE input: x through sum_gradients (the identity forward; the
    gradients all-summed), or x itself for an MoE that is not sharded."""
    group = getattr(moe, "sharding_group", None)
    if group is None:
        return x
    from mlx.nn.layers.distributed import sum_gradients

    return sum_gradients(group)(x)


def moe_output(moe, y):
    """mlx-lm's tensor-parallel MoE output: the routed combine plus the shared expert
    all-summed over the group (once, before the decoder layer adds its residual), or y."""
    group = getattr(moe, "sharding_group", None)
    if group is None:
        return y
    import mlx.core as mx

    return mx.distributed.all_sum(y, group=group)


# ---------------------------------------------------------------- the CLIs under mlx.launch


def world():
    """The group `mlx.launch` started this process in (more than one process), else None.
    mx.distributed.init reads the launcher's settings (a hostfile and rank for ring, NCCL's
    host and port); a process started on its own gets a group of one."""
    import mlx.core as mx

    from zmlx import config

    if not config.launched() or not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def groups_memo(model) -> dict[int, Any]:
    """A copy.deepcopy memo that keeps the model's mx.distributed groups shared (a Group
    cannot be copied): a copy of a sharded model, as zmlx.accuracy's float32 reference,
    computes in the same group as the model."""
    import mlx.core as mx

    memo: dict[int, Any] = {}
    for _, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, mx.distributed.Group):
                memo[id(value)] = value
    return memo


def primary(group) -> bool:
    """Whether this process prints and writes ledger lines: rank 0, or not distributed."""
    return group is None or group.rank() == 0


def load(name: str, group, pipeline: bool = False):
    """(model, tokenizer, zmlx.models.ModelSource) of what `name` names (a synth spec, a
    checkpoint directory, a Hub id), split over `group` by mlx-lm: tensor parallel
    (`model.shard(group)`), or with `pipeline` its layers (`model.model.pipeline(group)`).
    A model that cannot be split so raises ShardError or zmlx.models.ModelLoadError, one
    line, before any weight is read where the checkpoint is local. mlx-lm's sharded_load
    splits it, except a local checkpoint on MLX's CUDA backend (NCCL): `_split_on_gpu`."""
    from pathlib import Path

    import mlx.core as mx

    from zmlx import models, synth

    name = str(name)
    size = group.size()
    if synth.is_spec(name):
        model, tokenizer, source = models.load(name)
        _check(model, size, pipeline)
        model.model.pipeline(group) if pipeline else model.shard(group)
        mx.eval(model.parameters())
        return model, tokenizer, source
    from mlx_lm.utils import load_model, sharded_load

    from zmlx import backend

    path = Path(name).expanduser()
    if path.exists():
        models._check_path(path)  # the same one-line errors as zmlx.models.load
        _check(load_model(path, lazy=True, strict=False)[0], size, pipeline)
    groups = {"pipeline_group": group} if pipeline else {"tensor_group": group}
    try:
        if path.exists() and backend.current() == "cuda":
            model, tokenizer, config = _split_on_gpu(path, group, pipeline)
        else:
            where = str(path) if path.exists() else name
            model, tokenizer, config = sharded_load(where, return_config=True, **groups)
    except Exception as e:  # mlx-lm raises many types for a model it cannot read or split
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise models.ModelLoadError(f"could not load {name} split over {size} processes: {first}") from None
    label = (config.get("zmlx_synth") or {}).get("layer_faithful")
    kind = "path" if path.exists() else "hub"
    quantization = models.quantization_of(config)
    return model, tokenizer, models.ModelSource(name, kind, config.get("model_type"), quantization, label)


def _split_on_gpu(path, group, pipeline: bool):
    """(model, tokenizer, config) of the local checkpoint `path` split over `group`, as
    mlx-lm's sharded_load splits it, but with the closing barrier on the default (GPU) stream:
    mlx-lm 0.32.2's sharded_load ends with an all-sum on the CPU stream, which MLX's NCCL
    backend cannot run ("There is no Stream(gpu, 1) in current thread")."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(path, lazy=True, strict=False)
    tokenizer = load_tokenizer(path, {"trust_remote_code": True}, eos_token_ids=config.get("eos_token_id"))
    model.model.pipeline(group) if pipeline else model.shard(group)
    mx.eval(model.parameters())  # the weights are read here, after the split
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every process has loaded
    return model, tokenizer, config


def gpu_safe(sharded_load: Callable) -> Callable:
    """mlx-lm's `sharded_load` as its distributed commands call it (`zmlx chat|server` under
    `mlx.launch`), made to finish on MLX's CUDA backend: a local checkpoint split over one
    group is checked and loaded by `_split_on_gpu` there; every other call is mlx-lm's own."""
    import functools
    from pathlib import Path

    from zmlx import backend

    @functools.wraps(sharded_load)
    def load(repo, pipeline_group=None, tensor_group=None, return_config=False, **kwargs):
        path = Path(str(repo)).expanduser()
        one_group = (pipeline_group is None) != (tensor_group is None)
        if backend.current() != "cuda" or not one_group or not path.exists():
            return sharded_load(repo, pipeline_group, tensor_group, return_config, **kwargs)
        from mlx_lm.utils import load_model

        group, pipeline = (tensor_group, False) if tensor_group is not None else (pipeline_group, True)
        _check(load_model(path, lazy=True, strict=False)[0], group.size(), pipeline)
        model, tokenizer, config = _split_on_gpu(path, group, pipeline)
        return (model, tokenizer, config) if return_config else (model, tokenizer)

    return load


def _check(model, size: int, pipeline: bool) -> None:
    if not pipeline:
        check_shardable(model, size)
        return
    inner: Any = getattr(model, "model", None)
    if not callable(getattr(inner, "pipeline", None)):
        mt = getattr(model, "model_type", type(model).__name__)
        raise ShardError(f"model type {mt!r} has no pipeline parallelism in mlx-lm (no pipeline() method)")
    if len(inner.layers) < size:
        raise ShardError(f"{len(inner.layers)} layers do not split over {size} processes")
    from zmlx import backend

    if size > 1 and backend.current() == "cuda":
        # seen on two H200s (MLX 0.32.4, NCCL): the first step fails in a pipeline stage's
        # recv with "Recv has no CUDA implementation"
        raise ShardError(
            "pipeline parallelism cannot run on MLX's CUDA backend (its send/recv have no CUDA "
            "implementation); split the model tensor parallel instead"
        )
