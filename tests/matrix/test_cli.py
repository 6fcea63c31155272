"""python -m zmlx.matrix run|history|report|merge on the tiny preset and fixture ledgers."""

import json
import subprocess
import sys

from zmlx.matrix import ledger as L

TINY = "synth:glm4_moe_lite/tiny/affine4"


def matrix(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zmlx.matrix", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_run_appends_a_measured_line(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix("run", TINY, "--runs", "2", "--max-tokens", "8", "--notes", "ci", "--ledger", str(ledger))
    assert p.returncode == 0, p.stderr
    p = matrix("run", TINY, "--patterns", "none", "--runs", "1", "--max-tokens", "8", "--ledger", str(ledger))
    assert p.returncode == 0, p.stderr
    patched, noise = L.read(ledger).entries
    assert patched["patterns"] == ["moe_router", "moe_combine"]
    assert patched["fidelity"] == "PASS" and patched["fidelity_detail"]["identical"] == 8
    assert len(patched["decode_tps"]) == len(patched["stock_decode_tps"]) == 2
    assert patched["speedup"] == patched["decode_tps_median"] / patched["stock_decode_tps_median"]
    assert patched["family"] == "glm4_moe_lite" and patched["quantization"] == "affine4/g64"
    assert patched["notes"] == "ci" and patched["versions"]["mlx"] and "commit" in patched["git"]
    assert patched["kernels_per_token"] is None and "CUDA" in patched["kernels_note"]
    assert noise["patterns"] == [] and noise["fidelity"] == "PASS"


def test_default_ledger_is_in_the_current_directory(tmp_path):
    p = matrix("run", TINY, "--runs", "1", "--max-tokens", "4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(L.read(tmp_path / "matrix.jsonl").entries) == 1


def test_skip_ram_is_recorded_without_loading(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix("run", "synth:glm4_moe_lite/flash/affine4", "--max-memory-gb", "4", "--ledger", str(ledger))
    assert p.returncode == 0 and "SKIP(RAM)" in p.stdout
    (e,) = L.read(ledger).entries
    assert e["fidelity"] == "SKIP(RAM)" and "needs ~16.8 GB" in e["skip_reason"]
    assert e["patterns"] == ["moe_router", "moe_combine"]
    assert e["quantization"] == "affine4/g64"


def test_bad_input_exits_2(tmp_path):
    p = matrix("run", TINY, "--patterns", "bogus", "--ledger", str(tmp_path / "m.jsonl"))
    assert p.returncode == 2 and "unknown pattern" in p.stderr and "Traceback" not in p.stderr
    p = matrix("run", "/no/such", "--ledger", str(tmp_path / "m.jsonl"))
    assert p.returncode == 2 and "no such path" in p.stderr
    p = matrix("merge", str(tmp_path / "none.jsonl"), "--ledger", str(tmp_path / "m.jsonl"))
    assert p.returncode == 2 and "no such ledger" in p.stderr
    assert not (tmp_path / "m.jsonl").exists()


def _fixture_ledger(path):
    base = {"schema": L.SCHEMA, "schema_version": 1, "family": "glm4_moe_lite", "quantization": "affine4/g64",
            "device": {"name": "cuda (NVIDIA H100 80GB HBM3)", "backend": "cuda"}, "runs": 3, "notes": ""}
    rows = [
        dict(base, timestamp="2026-11-24T01:00:00+00:00", model="synth:flash", patterns=[], max_tokens=200,
             fidelity="PASS", stock_decode_tps_median=30.0, decode_tps_median=30.3, speedup=1.01,
             kernels_per_token=2400.0, stock_kernels_per_token=2400.0),
        dict(base, timestamp="2026-11-24T01:10:00+00:00", model="synth:flash", patterns=["moe_router"],
             max_tokens=200, fidelity="PASS", stock_decode_tps_median=30.0, decode_tps_median=33.0,
             speedup=1.1, kernels_per_token=2300.0, stock_kernels_per_token=2400.0),
        dict(base, timestamp="2026-11-24T01:20:00+00:00", model="synth:flash", patterns=["moe_router"],
             max_tokens=200, fidelity="PASS", stock_decode_tps_median=31.0, decode_tps_median=35.0,
             speedup=1.129, kernels_per_token=2300.0, stock_kernels_per_token=2400.0),
        dict(base, timestamp="2026-11-24T01:30:00+00:00", model="synth:other", patterns=["moe_router"],
             max_tokens=200, fidelity="SKIP(RAM)", skip_reason="needs ~90 GB"),
    ]
    for r in rows:
        L.append(r, path)
    with open(path, "a") as f:
        f.write("garbage\n")


def test_history_and_report_on_a_fixture_ledger(tmp_path):
    ledger = tmp_path / "m.jsonl"
    _fixture_ledger(ledger)
    p = matrix("history", "flash", "--ledger", str(ledger))
    assert p.returncode == 0 and "3 line(s)" in p.stdout and "synth:other" not in p.stdout
    assert "line 5: not JSON" in p.stderr
    p = matrix("history", "--json", "--ledger", str(ledger))
    assert len(json.loads(p.stdout)) == 4
    p = matrix("report", "--ledger", str(ledger))
    assert p.returncode == 0, p.stderr
    assert "1.129" in p.stdout and "1.100" not in p.stdout  # the latest line per pattern set
    assert "noise floor" in p.stdout and "SKIP(RAM)" in p.stdout and "2400 -> 2300" in p.stdout
    rows = json.loads(matrix("report", "--json", "--ledger", str(ledger)).stdout)
    router = next(r for r in rows if r["model"] == "synth:flash" and r["patterns"] == ["moe_router"])
    assert router["measurements"] == 2 and router["patched_decode_tps"] == 35.0


def test_report_on_empty_ledger(tmp_path):
    p = matrix("report", "--ledger", str(tmp_path / "none.jsonl"))
    assert p.returncode == 0 and "no measurements yet" in p.stdout


def test_several_pattern_sets_share_one_control(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix("run", TINY, "--patterns", "moe_router", "--patterns", "residual_norm", "--patterns", "none",
               "--runs", "2", "--max-tokens", "6", "--ledger", str(ledger))
    assert p.returncode == 0, p.stderr
    router, norm, noise = L.read(ledger).entries
    assert router["patterns"] == ["moe_router"] and norm["patterns"] == ["residual_norm"]
    assert noise["patterns"] == []
    assert router["stock_decode_tps"] == norm["stock_decode_tps"] == noise["stock_decode_tps"]
    for e in (router, norm, noise):
        assert e["fidelity"] == "PASS" and "3 sets share one control" in e["notes"]
    assert router["gpu_us_per_token"] is None
