"""Which classes each pattern targets, per model family. Data, not heuristics.

A model's family is its `args.model_type` (GLM-5 and Kimi build their layers from
DeepSeek classes, so the class's module says nothing about the family). For each
family: the mlx-lm module that defines its classes, the class each pattern patches,
per-family parameters a pattern needs, the default preset (exact patterns) and what the
`fast` preset adds (close patterns, each with the ledger line that shows it ACCURATE).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from zmlx.backend import Backend


@dataclass(frozen=True)
class Target:
    cls: str  # class name in the family's mlx-lm module
    params: Mapping[str, Any] = field(default_factory=dict)
    module: str | None = None  # another mlx-lm module that defines `cls` (Kimi's Model)


@dataclass(frozen=True)
class Family:
    model_type: str
    module: str
    targets: Mapping[str, Target]  # pattern name -> target
    preset: tuple[str, ...]  # applied by patch(model) with no selection
    # backend -> the preset there instead, where the ledger shows more exact and faster
    # on that backend than on the others (a `close` kernel can be bitwise on one backend)
    presets_on: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # backend -> {close pattern: id of the current matrix.jsonl line (zmlx.matrix.ledger.line_id)
    # whose verdict is ACCURATE for this family on this backend with that pattern}: what
    # preset="fast" adds there. The package has no ledger at run time, so the evidence is
    # named here and tests/test_presets.py checks each id against the repository's ledger.
    fast_on: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # pattern -> why it has no target in this family (the report's skip reason)
    skips: Mapping[str, str] = field(default_factory=dict)

    def target_class(self, pattern: str) -> type:
        target = self.targets[pattern]
        return getattr(importlib.import_module(target.module or self.module), target.cls)

    def preset_on(self, backend: Backend) -> tuple[str, ...]:
        """The default preset on `backend` ('cuda', 'metal', 'cpu')."""
        return self.presets_on.get(backend, self.preset)

    def fast_added(self, backend: Backend) -> tuple[str, ...]:
        """The close patterns preset="fast" adds on `backend` (ACCURATE in the ledger there)."""
        return tuple(self.fast_on.get(backend, {}))

    def preset_named(self, preset: str, backend: Backend) -> tuple[str, ...]:
        """The patterns of preset `preset` ('default' or 'fast') on `backend`."""
        base = self.preset_on(backend)
        if preset != "fast":
            return base
        return base + tuple(n for n in self.fast_added(backend) if n not in base)


FAMILIES: dict[str, Family] = {
    "glm4_moe_lite": Family(
        model_type="glm4_moe_lite",
        module="mlx_lm.models.glm4_moe_lite",
        targets={
            # glm4_moe_lite renormalizes with `+ 1e-20`; DeepSeek-V3 does not.
            "moe_router": Target("MoEGate", {"renorm_eps": 1e-20}),
            "moe_combine": Target("Glm4MoeLiteMoE"),
            "residual_norm": Target("Glm4MoeLiteModel"),
            # close (exact on CUDA): in the CUDA preset
            "moe_mlp": Target("SwitchGLU"),
            "downproj_combine": Target("Glm4MoeLiteMoE"),
            "swiglu_mlp": Target("Glm4MoeLiteMLP"),  # shared experts and the dense first layer
            "glm47_rope": Target("Glm4MoeLiteAttention"),  # exact; in the CUDA preset
            "mla_attention": Target("Glm4MoeLiteAttention"),  # close: opt-in
            # close (bitwise stock unless the cache is quantized): reads mlx-lm's quantized KV
            # cache (kv_bits); opt-in, `zmlx generate|chat|server --kv-bits` turns it on
            "mla_kv_quant": Target("Glm4MoeLiteAttention"),
            # close (exact on CUDA): the decoder layer's MoE half in three launches; in the
            # CUDA preset
            "moe_block": Target("Glm4MoeLiteDecoderLayer", {"renorm_eps": 1e-20}),
            # static latent cache, decode steps as one compiled graph: close (exact on the CPU;
            # on CUDA its tokens differ from stock's from the first decoded one): in `fast`
            # on CUDA, where the ledger shows it ACCURATE and faster (fast_on below)
            "compiled_decode": Target("Model"),
            # close: the decoder layer's attention half in four launches and o_proj; in `fast`
            # on CUDA (fast_on below)
            "mla_block": Target("Glm4MoeLiteDecoderLayer"),
            # exact on CUDA and the CPU: the attention half's first seven launches in two, then
            # mlx-lm's ops; in the CUDA preset (it yields to mla_block and mla_attention)
            "mla_prologue": Target("Glm4MoeLiteDecoderLayer"),
        },
        # residual_norm is exact but slower than stock in the ledger (one fused call costs
        # more host time than the two stock ops it replaces): opt in with ZMLX_RESIDUAL_NORM=1.
        preset=("moe_router", "moe_combine"),
        presets_on={
            # A pattern joins a backend's preset when it is exact there and the ledger shows
            # it faster than stock with identical tokens. On CUDA the expert kernels and
            # glm47_rope are bitwise stock (close on Metal, where no run has shown identical
            # tokens yet). downproj_combine takes over moe_combine's method (prompts still
            # run the combine kernel), so moe_combine is not listed. swiglu_mlp is exact but
            # slower in the ledger, so opt-in. moe_block (the MoE half of a layer at decode
            # in three launches; its kernels are bitwise stock on CUDA) runs the decode
            # steps, the module patterns the prompts. The lines: STATUS.md; the history:
            # benchmarks/NOTEBOOK.md. mla_prologue (the attention half's first seven launches
            # in two, bitwise stock) joined once its GPU time fell below the preset's without it
            # (5.84 vs 6.40 ms per token, same run: 5d3e65c193, 8d7cc168b3).
            "cuda": ("moe_router", "moe_mlp", "downproj_combine", "glm47_rope", "moe_block", "mla_prologue"),
        },
        # On the CPU mla_attention runs its float32 reference: closer to the float32 model
        # than stock under the accuracy rule. On CUDA `fast` is the line that measured the CUDA
        # preset (mla_prologue included) + mla_block + compiled_decode ACCURATE after a
        # 32-token prompt, the static cache writing by scatter (b6e4c5fa57; before that write,
        # fc59315475): mla_block's attention half inside the compiled step, mla_prologue
        # yielding to it.
        # mla_attention (ACCURATE with the expert kernels: 635fee972e) is not in it: mla_block runs the
        # attention half at decode, and the measured set did not hold it.
        skips={"gqa_prologue": "MLA attention (mla_prologue fuses its first launches)"},
        fast_on={
            "cpu": {"mla_attention": "e9fba61980"},
            "cuda": {"mla_block": "b6e4c5fa57", "compiled_decode": "b6e4c5fa57"},
        },
    ),
}


# ---------------------------------------------------------------- more families
#
# Each class named below was read in mlx-lm's module for the family. The default preset on
# the CPU and Metal is the patterns that are exact on every backend; on CUDA it is the ones
# whose kernels are bitwise stock in the `cuda` tests, as for glm4_moe_lite, but no ledger
# line exists for these families yet (so nothing is in `fast`, and swiglu_mlp and
# residual_norm, slower than stock on glm4_moe_lite, stay opt-in).

# mlx-lm's DeepSeek-V3 router renormalizes without glm4_moe_lite's `+ 1e-20` (so do
# deepseek_v32, GLM-5 built from it, and glm4_moe).
_NO_EPS: Mapping[str, Any] = {"renorm_eps": None}
_GQA = "GQA attention, not MLA (the attention patterns fuse MLA's latent attention)"
# the patterns of MLA attention (and its latent cache), which the other families skip
_MLA_PATTERNS = (
    "glm47_rope",
    "mla_attention",
    "mla_block",
    "mla_prologue",
    "compiled_decode",
    "mla_kv_quant",
)
# compiled_decode's static cache stands in for any KVCache: the GQA families take it too
_MLA_ONLY = tuple(p for p in _MLA_PATTERNS if p != "compiled_decode")
# opt-in on the GQA families: close (mx.compile fuses elementwise ops; exact on the CPU, its
# family tests) until the ledger shows it ACCURATE there on CUDA
_COMPILED = Target("Model")
# their Model.__call__ takes (inputs, cache, input_embeddings)
_COMPILED_EMBEDDINGS = Target("Model", {"input_embeddings": True})
_DSA_LOOP = "the model loop takes the mask from the DSA CacheList; residual_norm runs DeepSeek-V3's loop"
_SOFTMAX = (
    "softmax router inside the MoE block (softmax_router fuses it); moe_router fuses the sigmoid "
    "MoEGate with correction bias"
)
_SIGMOID = (
    "sigmoid MoEGate router (moe_router fuses it); softmax_router fuses Qwen3-MoE's, Mixtral's and gpt-oss's"
)
_BLOCK_ROUTES = (
    "the MoE block routes in its own __call__ (softmax, scores in the activations' dtype): "
    "downproj_combine is its combine piece (zmlx.patch.softmax_moe)"
)
_OSS_EXPERTS = "the experts have biases and SwigluOAI; downproj_combine takes bias-free SwiGLU experts"


def _deepseek(model_type: str, module: str, prefix: str, model_module: str | None = None) -> Family:
    """The DeepSeek-V3 family: MLA attention, sigmoid MoEGate with correction bias (group-limited
    where n_group > 1: the router kernels compute that too), SwitchGLU experts, a shared
    expert. `prefix` names the module's classes (DeepseekV3, DeepseekV32). The DSA models
    (deepseek_v32, glm_moe_dsa) have an indexer: the attention patterns' checks refuse it."""
    dsa = prefix == "DeepseekV32"
    targets = {
        "moe_router": Target("MoEGate", _NO_EPS),
        "moe_combine": Target(f"{prefix}MoE"),
        "downproj_combine": Target(f"{prefix}MoE"),
        "moe_mlp": Target("SwitchGLU"),
        "swiglu_mlp": Target(f"{prefix}MLP"),
        "glm47_rope": Target(f"{prefix}Attention"),
        "mla_attention": Target(f"{prefix}Attention"),
        "mla_kv_quant": Target(f"{prefix}Attention"),
        "moe_block": Target(f"{prefix}DecoderLayer", _NO_EPS),
        "mla_block": Target(f"{prefix}DecoderLayer"),
        "mla_prologue": Target(f"{prefix}DecoderLayer"),  # the DSA models: its check refuses
        "compiled_decode": Target("Model", module=model_module),
    }
    if not dsa:
        targets["residual_norm"] = Target(f"{prefix}Model")
    # as glm4_moe_lite's: exact everywhere; on CUDA the expert kernels are bitwise stock in the
    # cuda tests (downproj_combine takes over moe_combine's method). moe_router (whose kernel
    # runs these models' group-limited routing) and moe_block joined once the whole preset ran
    # bitwise stock on these families' models on the H200 (tests/patch/test_family_cuda_presets.py,
    # log 20261130-h200x2-cuda-tests-families-widened-timeout-cfc0e73.log). glm47_rope (their
    # YaRN rope) waits for that test's YaRN cases, which the run's time limit cut.
    cuda = ("moe_router", "moe_mlp", "downproj_combine", "moe_block")
    return Family(
        model_type=model_type,
        module=module,
        targets=targets,
        preset=("moe_router", "moe_combine"),
        presets_on={"cuda": cuda},
        skips={
            "softmax_router": _SIGMOID,
            "gqa_prologue": "MLA attention (mla_prologue fuses its first launches)",
            **({"residual_norm": _DSA_LOOP} if dsa else {}),
        },
    )


def _softmax_moe(
    model_type: str,
    module: str,
    targets: Mapping[str, Target],
    skips: dict,
    cuda_extra: tuple[str, ...] = (),
) -> Family:
    """A family with a softmax router inside the MoE block (Qwen3-MoE, Mixtral): the experts'
    kernels and softmax_router (the block's routing) apply; both are exact on CUDA (close on
    Metal, so not in that preset), `cuda_extra` the family's other exact CUDA patterns."""
    return Family(
        model_type=model_type,
        module=module,
        targets=targets,
        preset=(),
        # bitwise stock on CUDA on these families' models (tests/patch/test_family_cuda_presets.py)
        presets_on={"cuda": ("moe_mlp", "softmax_router", *cuda_extra)},
        skips={
            "moe_router": _SOFTMAX,
            "moe_combine": _BLOCK_ROUTES,
            **{p: _GQA for p in _MLA_ONLY},
            **skips,
        },
    )


_MIXTRAL_MOE = "block_sparse_moe"  # Mixtral's decoder layer's MoE module (others': mlp)

FAMILIES.update(
    {
        "deepseek_v3": _deepseek("deepseek_v3", "mlx_lm.models.deepseek_v3", "DeepseekV3"),
        # Kimi-K2/K2.5: DeepSeek-V3's classes under its own Model (a language_model inside)
        "kimi_k25": _deepseek(
            "kimi_k25", "mlx_lm.models.deepseek_v3", "DeepseekV3", model_module="mlx_lm.models.kimi_k25"
        ),
        "deepseek_v32": _deepseek("deepseek_v32", "mlx_lm.models.deepseek_v32", "DeepseekV32"),
        # GLM-5: DeepSeek-V3.2's classes (its router has no `+ 1e-20`)
        "glm_moe_dsa": _deepseek("glm_moe_dsa", "mlx_lm.models.deepseek_v32", "DeepseekV32"),
        # GLM-4.5/4.6: GQA attention, the DeepSeek-V3 MoE (sigmoid MoEGate, shared expert)
        "glm4_moe": Family(
            model_type="glm4_moe",
            module="mlx_lm.models.glm4_moe",
            targets={
                "moe_router": Target("MoEGate", _NO_EPS),
                "moe_combine": Target("MoE"),
                "downproj_combine": Target("MoE"),
                "moe_mlp": Target("SwitchGLU"),
                "swiglu_mlp": Target("MLP"),
                "moe_block": Target("DecoderLayer", _NO_EPS),
                # the attention half's first launches in two at decode (q/k biases, optional
                # q/k norms, partial RoPE in qk_norm_rope); in the CUDA preset, whose layers
                # are bitwise stock on the H200 at GLM-4.5-Air's widths (test_gqa_prologue.py,
                # test_qk_norm_rope_variants.py, test_family_cuda_presets.py)
                "gqa_prologue": Target("DecoderLayer"),
                "compiled_decode": _COMPILED,
            },
            preset=("moe_router", "moe_combine"),
            # moe_block: bitwise stock on the GPU with the rest (test_family_cuda_presets.py)
            presets_on={"cuda": ("moe_router", "moe_mlp", "downproj_combine", "moe_block", "gqa_prologue")},
            skips={
                **{p: _GQA for p in _MLA_ONLY},
                "residual_norm": "the model loop passes a 'causal' mask, residual_norm's loop an array",
                "softmax_router": _SIGMOID,
            },
        ),
        "qwen3_moe": _softmax_moe(
            "qwen3_moe",
            "mlx_lm.models.qwen3_moe",
            {
                "moe_mlp": Target("SwitchGLU"),
                # exact on CUDA (close on Metal): in the CUDA preset
                "softmax_router": Target("Qwen3MoeSparseMoeBlock", {"softmax_first": True}),
                # the block's combine piece at decode (scores in T); in the CUDA preset (bitwise
                # stock with it on the GPU: test_family_cuda_presets.py)
                "downproj_combine": Target("Qwen3MoeSparseMoeBlock", {"softmax_first": True}),
                "swiglu_mlp": Target("MLP"),  # the dense layers (mlp_only_layers)
                # the dense layers, and the MoE layers with mlx-lm's gate module between its
                # residual_norm and softmax_router launches
                "moe_block": Target("Qwen3MoeDecoderLayer", {"softmax_first": True}),
                # the attention half's first eight launches in two at decode: its layers bitwise
                # stock on the H200 at Qwen3-30B-A3B's widths (test_gqa_prologue.py's cuda
                # tests), the 30B's preset token-identical and 1.412x (c0c991e6fe): in the preset
                "gqa_prologue": Target("Qwen3MoeDecoderLayer"),
                "compiled_decode": _COMPILED_EMBEDDINGS,
            },
            {"residual_norm": "the model loop passes a 'causal' mask, residual_norm's loop an array"},
            cuda_extra=("moe_block", "downproj_combine", "gqa_prologue"),
        ),
        "mixtral": _softmax_moe(
            "mixtral",
            "mlx_lm.models.mixtral",
            {
                "moe_mlp": Target("SwitchGLU"),
                # exact on CUDA (close on Metal): in the CUDA preset
                "softmax_router": Target("MixtralSparseMoeBlock", {"softmax_first": False}),
                # the block's combine piece at decode (scores in T); opt-in until its cuda tests run
                "downproj_combine": Target("MixtralSparseMoeBlock", {"softmax_first": False}),
                # the decoder layer's halves at decode, its MoE module named block_sparse_moe:
                # bitwise mlx-lm on the CPU (tests/patch/test_moe_block_softmax.py,
                # test_gqa_prologue.py); opt-in until their cuda tests run on a GPU
                "moe_block": Target(
                    "MixtralDecoderLayer", {"softmax_first": False, "mlp_name": _MIXTRAL_MOE}
                ),
                "gqa_prologue": Target("MixtralDecoderLayer", {"mlp_name": _MIXTRAL_MOE}),
                "compiled_decode": _COMPILED_EMBEDDINGS,
            },
            {
                "swiglu_mlp": "no dense MLP (every layer is MoE, no shared expert)",
                "residual_norm": "the decoder layer calls block_sparse_moe, not mlp",
            },
        ),
    }
)

# gpt-oss: GQA attention with sinks and alternating sliding-window layers, an MLPBlock that
# routes by a softmax over the top-k of a biased router (softmax_router fuses the routing after
# the router), SwitchGLU experts with biases and the clamped SwiGLU (SwigluOAI: moe_mlp's
# kernel adds the gate and up biases and applies it; affine, unquantized or mxfp4 experts,
# the released models' mxfp4 included). Both are exact on the CPU (their
# references) and on CUDA, close on Metal: the CPU/Metal preset is empty (no pattern is exact
# on Metal); the CUDA preset is both, bitwise stock on the H200 (test_moe_mlp_oai.py, 69 cases;
# test_gpt_oss_family.py, bf16/affine4/mxfp4; test_family_cuda_presets.py: log
# benchmarks/results/20261201-h200-gpt-oss-preset-tests-9b91772-dirty.log).
_OSS_ATTENTION = "GQA attention with sinks and sliding windows, not MLA (the attention patterns fuse MLA's)"
FAMILIES["gpt_oss"] = Family(
    model_type="gpt_oss",
    module="mlx_lm.models.gpt_oss",
    targets={
        "softmax_router": Target("MLPBlock", {"softmax_first": False, "topk_last": True}),
        "moe_mlp": Target("SwitchGLU"),  # affine, unquantized or mxfp4 experts
        # the MoE half at decode (zmlx.patch.softmax_layer), behind moe_block.SOFTMAX_LAYERS
        "moe_block": Target("TransformerBlock", {"softmax_first": False, "topk_last": True}),
        # the attention half's first launches in two at decode (biases, YaRN's rope, the sinks
        # passed to mlx-lm's SDPA; the sliding-window layers' RotatingKVCache too); in the
        # CUDA preset (bitwise stock on the H200: test_gqa_prologue.py, test_qk_norm_rope_variants.py,
        # test_family_cuda_presets.py); it refuses mxfp4 attention projections
        "gqa_prologue": Target("TransformerBlock"),
    },
    preset=(),
    presets_on={"cuda": ("softmax_router", "moe_mlp", "moe_block", "gqa_prologue")},
    skips={
        "moe_router": _SOFTMAX,
        "moe_combine": _BLOCK_ROUTES,
        "downproj_combine": _OSS_EXPERTS,
        "swiglu_mlp": "no dense MLP (every layer's MLPBlock is MoE, no shared expert)",
        "residual_norm": "the model loop passes each layer a full or a sliding-window mask by its type",
        **{p: _OSS_ATTENTION for p in _MLA_ONLY},
        "compiled_decode": "sliding-window layers (RotatingKVCache): the static cache stands in for KVCache",
    },
)

# model_type -> why no pattern applies (patch() warns "nothing to patch" with this reason)
UNSUPPORTED: dict[str, str] = {}


def family_of(model) -> str | None:
    """The model's `args.model_type`, or None when it has none."""
    args = getattr(model, "args", None)
    return getattr(args, "model_type", None)
