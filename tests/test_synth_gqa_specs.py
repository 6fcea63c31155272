"""The GQA families' (glm4_moe, qwen3_moe, mixtral) and gpt-oss's generators are pinned: each
preset's config.json and its ordered tensor specs (name, shape, scale, dtype: the order is the
safetensors files' byte order) hash to the values they had before their builders were shared,
so that a refactor of the builders cannot change a checkpoint."""

import hashlib
import json

import pytest

from zmlx.synth_families import FAMILIES
from zmlx.synth_families.base import text_config

PINNED = {
    # (family, preset): sha256 of the config and the tensor specs
    ("glm4_moe", "tiny"): "dc67c834b0137f4ec1bb4384b16e9f5ceb982b3314f420f7fce85747235d6bba",
    ("glm4_moe", "air"): "d3d1e51de8856d178fa14b322ad0cfc0205aba347b8e8937ffda24792f07712c",
    ("qwen3_moe", "tiny"): "3a004d4d564f9702f1e951d5356d45c16f8bc1630c888f8f0095101369a54c63",
    ("qwen3_moe", "30b_a3b"): "140621f740fedad63cfc37a4245cc8fb6b6dde4eacde08f3a07c72031e236f8f",
    ("mixtral", "tiny"): "0966e578ed2a06a644b16ed35e23433657717883e6ca4f918b18168d78c16289",
    ("mixtral", "8x7b"): "a970c555bff4b263a2b66993956d5744063911f1310a6df238daf02328071296",
    ("gpt_oss", "tiny"): "a5573fa1cdf663c71ed1feaa239b69b4d4a47db676cf2369f1dd839ccb383deb",
    ("gpt_oss", "20b"): "fb8e7253b43f3d4c33824ee45af62d4efd0fda6fe57c15476f2b05b1744e79df",
}


def _digest(family: str, preset: str) -> str:
    f = FAMILIES[family]
    cfg = f.config(preset)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for part in (None, *range(text_config(cfg)["num_hidden_layers"])):
        for name, t in f.tensors(cfg, part).items():
            dtype = "float32" if t.float32 else "bfloat16"
            h.update(repr((name, t.shape, t.std, t.mean, dtype, t.zero_first_row)).encode())
    return h.hexdigest()


@pytest.mark.parametrize("family, preset", sorted(PINNED))
def test_preset_configs_and_tensor_specs_are_unchanged(family, preset):
    assert _digest(family, preset) == PINNED[family, preset]


def test_every_preset_of_these_families_is_pinned():
    want = {(m, p) for m in ("glm4_moe", "qwen3_moe", "mixtral", "gpt_oss") for p in FAMILIES[m].presets}
    assert set(PINNED) == want
