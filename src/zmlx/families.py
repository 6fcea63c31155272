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

    def target_class(self, pattern: str) -> type:
        return getattr(importlib.import_module(self.module), self.targets[pattern].cls)

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
            # close (exact on CUDA): opt-in until the ledger shows them faster
            "moe_mlp": Target("SwitchGLU"),
            "downproj_combine": Target("Glm4MoeLiteMoE"),
            "swiglu_mlp": Target("Glm4MoeLiteMLP"),  # shared experts and the dense first layer
            "glm47_rope": Target("Glm4MoeLiteAttention"),  # exact; in the CUDA preset
            "mla_attention": Target("Glm4MoeLiteAttention"),  # close: opt-in
            # close (exact on CUDA): the decoder layer's MoE half in three launches; opt-in
            # until the ledger shows it faster
            "moe_block": Target("Glm4MoeLiteDecoderLayer", {"renorm_eps": 1e-20}),
            # static latent cache, decode steps as one compiled graph: opt-in until the ledger
            # shows it faster with identical tokens on the GPU
            "compiled_decode": Target("Model"),
            # close: the decoder layer's attention half in four launches and o_proj; opt-in
            # until an ACCURATE ledger line puts it in `fast`
            "mla_block": Target("Glm4MoeLiteDecoderLayer"),
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
            # slower in the ledger, so opt-in. The lines: STATUS.md; the history:
            # benchmarks/NOTEBOOK.md.
            "cuda": ("moe_router", "moe_mlp", "downproj_combine", "glm47_rope"),
        },
        # On the CPU mla_attention runs its float32 reference: closer to the float32 model
        # than stock under the accuracy rule. On CUDA its kernels (with the CUDA preset) are
        # ACCURATE after 32- and 4096-token prompts (the 4096 line: 36a0fd85ab).
        fast_on={"cpu": {"mla_attention": "e9fba61980"}, "cuda": {"mla_attention": "635fee972e"}},
    ),
}


def family_of(model) -> str | None:
    """The model's `args.model_type`, or None when it has none."""
    args = getattr(model, "args", None)
    return getattr(args, "model_type", None)
