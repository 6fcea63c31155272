"""Capsules: versioned, atomic, readable back; the report prints one or compares several."""

import subprocess
import sys

import pytest

from zmlx.bench import capsule, stamp


def _variant(name, decode, kernels=None, skipped=None):
    runs = [
        {"prompt_tps": 100.0, "decode_tps": d, "peak_memory_gb": 1.5, "generated_tokens": 8} for d in decode
    ]
    return {
        "name": name,
        "patterns": [],
        "env": {},
        "unsafe": False,
        "note": "",
        "skipped": skipped,
        "runs": runs if not skipped else [],
        "summary": {
            "decode_tps": {
                "median": sorted(decode)[len(decode) // 2],
                "min": min(decode),
                "max": max(decode),
            },
            "prompt_tps": {"median": 100.0, "min": 100.0, "max": 100.0},
            "peak_memory_gb": 1.5,
        }
        if not skipped
        else {"decode_tps": None, "prompt_tps": None, "peak_memory_gb": None},
        "kernels_per_token": kernels,
        "kernels_note": "",
        "patch": None,
        "fidelity": {"verdict": "PASS", "identical": 8, "total": 8, "first_divergence": None},
    }


def _capsule(decode_control, decode_patched):
    return capsule.build(
        name="unit",
        model={
            "name": "synth:glm4_moe_lite/tiny/affine4",
            "kind": "synth",
            "family": "glm4_moe_lite",
            "quantization": "affine4/g64",
        },
        params={"runs": 3, "max_tokens": 8, "prompt_tokens": 4},
        variants=[
            _variant("control", decode_control, 2400),
            _variant("patched", decode_patched, 2300),
            _variant("risky", [1.0], skipped="unsafe: pass --allow-unsafe to run it"),
        ],
        command=["bench", "--runs", "3"],
    )


def test_round_trip_is_versioned_and_stamped(tmp_path):
    cap = _capsule([30.0, 31.0, 29.0], [33.0, 34.0, 32.0])
    path = capsule.write(cap, tmp_path)
    assert capsule.load(path) == cap
    assert cap["schema_version"] == capsule.SCHEMA_VERSION and cap["baseline"] == "control"
    for key in ("python", "mlx", "mlx_lm", "zmlx"):
        assert cap["versions"][key]
    assert {"commit", "dirty"} <= cap["git"].keys()
    assert {"name", "backend", "memory_bytes"} <= cap["device"].keys()
    assert cap["command"] == "bench --runs 3"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_write_never_overwrites(tmp_path):
    cap = _capsule([30.0], [31.0])
    a, b = capsule.write(cap, tmp_path), capsule.write(cap, tmp_path)
    assert a != b and a.exists() and b.exists()


def test_a_capsule_refuses_a_stated_commit_the_checkout_does_not_hold(monkeypatch):
    # (without a checkout the stated commit is recorded as given: tests/bench/test_stamp.py)
    monkeypatch.setenv("ZMLX_GIT_COMMIT", "0123456789abcdef")
    with pytest.raises(stamp.GitStateError, match="is not a commit"):
        _capsule([1.0], [1.0])
    stated = {"commit": "abc123", "dirty": None}
    assert capsule.build(name="x", model={"name": "m"}, params={}, variants=[], git=stated)["git"] == stated


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "is not JSON"),
        ('{"a": 1}', "not a zmlx capsule"),
        ('{"schema": "zmlx.capsule", "schema_version": 99}', "upgrade zmlx"),
    ],
)
def test_load_rejects_what_it_cannot_read(tmp_path, content, message):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(capsule.CapsuleError, match=message):
        capsule.load(p)


@pytest.mark.slow
def test_report_prints_one_and_compares_two(tmp_path):
    a = capsule.write(_capsule([30.0, 31.0, 29.0], [33.0, 34.0, 32.0]), tmp_path / "a")
    b = capsule.write(_capsule([60.0, 62.0, 58.0], [66.0, 68.0, 64.0]), tmp_path / "b")
    p = subprocess.run([sys.executable, "-m", "zmlx.bench.report", str(a)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "30.0 [29.0-31.0]" in p.stdout and "1.100x" in p.stdout and "SKIP" in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "zmlx.bench.report", str(a), str(b)], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "ratio" in p.stdout and "2.000" in p.stdout  # b's decode is twice a's


@pytest.mark.slow
def test_report_bad_file_exits_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "zmlx.bench.report", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "no such capsule" in p.stderr and "Traceback" not in p.stderr
