"""A line measured by a model split over several ranks (mx.distributed) is reported on a device
of its own, beside the one-process line of the same set: neither hides the other, and each
ratio stands next to the noise floor of its own configuration."""

from zmlx.matrix import ledger as L
from zmlx.matrix import summary as S

BASE = {
    "schema": L.SCHEMA,
    "schema_version": 5,
    "model": "synth:flash",
    "quantization": "affine4/g64",
    "device": {"name": "cuda (NVIDIA H200)", "backend": "cuda"},
    "runs": 5,
    "max_tokens": 200,
    "prompt_tokens": 32,
    "fidelity": "PASS",
    "patterns": ["moe_router"],
    "git": {"commit": "a" * 40, "dirty": False},
}


def test_a_sharded_line_sits_beside_the_single_process_line():
    single = dict(BASE, timestamp="2026-11-30T17:09:00+00:00", speedup=1.40)
    sharded = dict(BASE, timestamp="2026-11-30T17:00:00+00:00", speedup=1.24, world_size=2)
    floor = dict(BASE, timestamp="2026-11-30T16:00:00+00:00", patterns=[], speedup=0.97)
    rows = S.summarize([single, sharded, floor])
    by = {(r["device"], tuple(r["patterns"])): r for r in rows}
    assert set(by) == {
        ("cuda (NVIDIA H200)", ("moe_router",)),
        ("cuda (NVIDIA H200) x 2 ranks", ("moe_router",)),
        ("cuda (NVIDIA H200)", ()),
    }
    assert by["cuda (NVIDIA H200) x 2 ranks", ("moe_router",)]["line"] == L.line_id(sharded)
    assert by["cuda (NVIDIA H200)", ("moe_router",)]["line"] == L.line_id(single)
    # the one-process floor is not the sharded configuration's
    assert abs(by["cuda (NVIDIA H200)", ("moe_router",)]["noise_floor"] - 0.03) < 1e-9
    assert by["cuda (NVIDIA H200) x 2 ranks", ("moe_router",)]["noise_floor"] is None
    md = S.markdown(rows)
    assert "on cuda (NVIDIA H200) x 2 ranks:" in md and md.count(L.line_id(sharded)) == 1


def test_one_rank_is_the_plain_device():
    assert S.device_label(dict(BASE, world_size=1)) == "cuda (NVIDIA H200)"
    assert S.device_label(BASE) == "cuda (NVIDIA H200)"
