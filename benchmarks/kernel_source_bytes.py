#!/usr/bin/env python3
"""Bytes of device code each kernel hands MLX, per decoder layer of GLM-4.7-Flash (CPU).

    python benchmarks/kernel_source_bytes.py [--capsule-dir DIR]

MLX's CUDA custom kernel rebuilds a kernel's whole source into a new string at every call
of the kernel function (mlx/backend/cuda/custom_kernel.cpp, 0.32); the host time that costs
was not measurable on the H200 (NOTEBOOK, eighth session). For the decode launches of one
layer under the CUDA default preset and under `fast`: each kernel's header + source as
written (ZMLX_KERNEL_COMMENTS=1) and as handed to MLX (compacted, zmlx.kernels.compact),
CUDA text. A count of the code, not a timing: it runs anywhere.
"""

from __future__ import annotations

from zmlx import config
from zmlx.bench import capsule, stamp
from zmlx.cli import args as cli_args
from zmlx.kernels.core import PRELUDE_HEADER, PRELUDE_SOURCE, KernelDef
from zmlx.kernels.mla_attention import mla_unembed
from zmlx.kernels.mla_decode_len import mla_decode_len
from zmlx.kernels.mla_q_prep import mla_q_prep, mla_q_prep_nope
from zmlx.kernels.moe_down import moe_down
from zmlx.kernels.moe_gate_up import moe_gate_up_route
from zmlx.kernels.norm_qkv_a import norm_qkv_a
from zmlx.kernels.norm_router import norm_router_gates

# The custom launches of one MoE decoder layer at decode (one token), glm4_moe_lite on CUDA.
MOE_HALF = (norm_router_gates, moe_gate_up_route, moe_down)
SETS: dict[str, tuple[KernelDef, ...]] = {
    "default": (norm_qkv_a, mla_q_prep_nope, *MOE_HALF),  # mla_prologue + moe_block
    "fast": (norm_qkv_a, mla_q_prep, mla_decode_len, mla_unembed, *MOE_HALF),  # + mla_block, compiled
}


def sizes(kernel: KernelDef) -> tuple[int, int]:
    """(bytes as written, bytes as handed) of the kernel's CUDA header + source."""
    written = len(PRELUDE_HEADER["cuda"] + kernel.header) + len(PRELUDE_SOURCE["cuda"] + (kernel.body or ""))
    return written, sum(len(t) for t in kernel.source("cuda"))


def main(argv: list[str] | None = None) -> None:
    parser = cli_args.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--capsule-dir", help="also write the counts as a repro capsule there")
    a = parser.parse_args(argv)
    if why := capsule.dir_problem(a.capsule_dir):
        parser.error(why)
    try:
        if config.kernel_comments():
            parser.error("unset ZMLX_KERNEL_COMMENTS: the counts compare the written text with the compacted")
    except config.ConfigError as e:
        parser.error(str(e))
    try:
        git = stamp.git()
    except stamp.GitStateError as e:
        parser.error(str(e))
    variants = []
    for name, kernels in SETS.items():
        rows = [{"kernel": k.name, "written": w, "handed": h} for k in kernels for w, h in [sizes(k)]]
        written, handed = sum(r["written"] for r in rows), sum(r["handed"] for r in rows)
        variants.append(
            {"name": name, "kernels": rows, "written_per_layer": written, "handed_per_layer": handed}
        )
        print(
            f"{name:8s} {len(rows)} launches a layer: {written:7d} B written -> {handed:7d} B handed to MLX"
        )
        for r in rows:
            print(f"  {r['kernel']:22s} {r['written']:7d} -> {r['handed']:7d}")
    if a.capsule_dir:
        cap = capsule.build(
            name="kernel_source_bytes",
            model={
                "name": "synth:glm4_moe_lite/flash/affine4",
                "kind": "code-size",
                "family": "glm4_moe_lite",
            },
            params={"backend_text": "cuda", "what": "bytes of header + source per decoder layer's launches"},
            variants=variants,
            git=git,
        )
        try:
            print(capsule.write_or_say(cap, a.capsule_dir))
        except ValueError as e:  # the numbers are printed above
            parser.error(str(e))


if __name__ == "__main__":
    main()
