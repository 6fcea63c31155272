"""Named experiment variants per model (data): a set of patterns plus env overrides."""

from __future__ import annotations

from zmlx.bench.harness import CONTROL, Variant

GLM47_FLASH: dict[str, Variant] = {
    v.name: v
    for v in (
        CONTROL,
        Variant("control_repeat", note="stock again: the noise floor of a ratio"),
        Variant("moe_router", ("moe_router",)),
        Variant("moe_combine", ("moe_combine",)),
        Variant("residual_norm", ("residual_norm",)),
        Variant("router_combine", ("moe_router", "moe_combine")),
        Variant("exact_three", ("moe_router", "moe_combine", "residual_norm"), note="every exact pattern"),
        Variant("moe_mlp", ("moe_mlp",), note="gate + up + SwiGLU kernel at decode (exact on CUDA)"),
        Variant("downproj_combine", ("downproj_combine",), note="down + combine kernel at decode"),
        Variant("swiglu_mlp", ("swiglu_mlp",), note="dense gate + up + SwiGLU kernel at decode"),
        Variant(
            "expert_fusion",
            ("moe_router", "moe_mlp", "downproj_combine"),
            note="router + both expert kernels",
        ),
        Variant(
            "all_mlp",
            ("moe_router", "moe_mlp", "downproj_combine", "swiglu_mlp"),
            note="router, both expert kernels and the dense MLP kernel",
        ),
        Variant("glm47_rope", ("glm47_rope",), note="MLA decode rope of q_pe and k_pe + scale, one launch"),
        Variant(
            "cuda_preset_rope",
            ("moe_router", "moe_mlp", "downproj_combine", "glm47_rope"),
            note="the CUDA preset with glm47_rope",
        ),
        Variant(
            "router_combine_overlap",
            ("moe_router", "moe_combine"),
            env={"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1"},
            note="the preset with the shared expert on a second stream (experiment)",
        ),
        Variant(
            "all_mlp_overlap",
            ("moe_router", "moe_mlp", "downproj_combine", "swiglu_mlp"),
            env={"ZMLX_MOE_SHARED_EXPERTS_OVERLAP": "1"},
            note="all_mlp with the shared expert on a second stream (experiment)",
        ),
    )
}
