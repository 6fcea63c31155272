#!/usr/bin/env python3
"""How far a synthetic model's bf16 run is from its float32 model (the accuracy rule's
yardstick), per spec: the `-calm` presets against the plain ones.

    python benchmarks/synth_calm.py [--specs tiny,tiny-calm,tiny-deep,tiny-deep-calm]
        [--quant affine4] [--positions 64] [--capsule-dir DIR]

For each glm4_moe_lite preset: the model built by zmlx.synth and its float32 reference
(zmlx.accuracy.reference_model), teacher-forced over the same seeded tokens through the
decode path; KL divergence reference -> bf16 in nats per position (mean ± s.e., p99),
"same top token" % and the reference's entropy. A model that is chaotic (bf16 rounding alone
moves it nats away) leaves the rule no power: a close kernel's difference is lost in it.
Runs on any backend (the CPU: a few seconds per 4-layer preset, a minute per 47-layer one).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from zmlx import synth
from zmlx.accuracy import Divergences, exact_float32, log_probs, reference_model
from zmlx.bench import capsule, stamp
from zmlx.bench.harness import make_prompt
from zmlx.cli import args as cli_args
from zmlx.fidelity import teacher_forced_logits

PROMPT_TOKENS = 8


def divergence(spec: str, positions: int) -> dict:
    """The row of one spec: the reference -> bf16 divergences over `positions` positions."""
    model, _ = synth.build(spec)
    ids = make_prompt(model.args.vocab_size, PROMPT_TOKENS + positions, seed=0)  # a position a token
    prompt, tokens = mx.array(ids[:PROMPT_TOKENS]), ids[PROMPT_TOKENS:]
    ref = reference_model(model)
    with exact_float32():
        lp_ref = log_probs(list(teacher_forced_logits(ref, prompt, tokens)))
    del ref
    lp = log_probs(list(teacher_forced_logits(model, prompt, tokens)))
    d = Divergences.between(lp_ref, lp)
    entropy = float(-(np.exp(lp_ref) * lp_ref).sum(axis=-1).mean())
    return {
        "name": spec,
        "layers": model.args.num_hidden_layers,
        "reference_vs_bf16": d.to_dict(),
        "reference_entropy_nats": entropy,
    }


def main(argv: list[str] | None = None) -> None:
    parser = cli_args.Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--specs", default="tiny,tiny-calm,tiny-deep,tiny-deep-calm", help="glm4_moe_lite presets"
    )
    parser.add_argument("--quant", default="affine4")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--capsule-dir", help="also write the rows as a repro capsule there")
    a = parser.parse_args(argv)
    if a.positions < 2:
        parser.error(f"--positions must be at least 2, got {a.positions}")
    if why := capsule.dir_problem(a.capsule_dir):
        parser.error(why)
    specs = [f"synth:glm4_moe_lite/{p.strip()}/{a.quant}" for p in a.specs.split(",") if p.strip()]
    if not specs:
        parser.error("--specs names no preset")
    try:
        for s in specs:
            synth.SynthSpec.parse(s)
        git = stamp.git()
    except (synth.SynthError, stamp.GitStateError) as e:
        parser.error(str(e))
    rows = []
    print(f"{'spec':44s} {'layers':>6s} {'KLD nats':>16s} {'p99':>7s} {'same top':>8s} {'H(ref)':>6s}")
    for s in specs:
        r = divergence(s, a.positions)
        d = r["reference_vs_bf16"]
        print(
            f"{s:44s} {r['layers']:6d} {d['kld_mean']:8.4f} ± {d['kld_sem']:.4f} {d['kld_p99']:7.3f} "
            f"{d['same_top']:7.1f}% {r['reference_entropy_nats']:6.2f}",
            flush=True,
        )
        rows.append(r)
    if a.capsule_dir:
        cap = capsule.build(
            name="synth_calm",
            model={
                "name": "synth:glm4_moe_lite (presets in variants)",
                "kind": "synthetic",
                "family": "glm4_moe_lite",
            },
            params={"positions": a.positions, "prompt_tokens": PROMPT_TOKENS, "quant": a.quant, "seed": 0},
            variants=rows,
            git=git,
        )
        try:
            print(capsule.write_or_say(cap, a.capsule_dir))
        except ValueError as e:  # the numbers are printed above
            parser.error(str(e))


if __name__ == "__main__":
    main()
