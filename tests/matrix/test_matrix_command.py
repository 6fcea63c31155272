"""python -m zmlx.matrix run|history|report|merge|supersede on the tiny preset and fixture ledgers."""

import json
import os
import subprocess
import sys

import pytest

from zmlx.matrix import ledger as L

TINY = "synth:glm4_moe_lite/tiny/affine4"
pytestmark = pytest.mark.slow  # each test runs the CLI in a subprocess


def matrix(*args, cwd=None, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "zmlx.matrix", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=environ,
    )


def test_run_appends_a_measured_line(tmp_path):
    ledger = tmp_path / "m.jsonl"
    # --no-accuracy: the tokens are identical (PASS) either way; the rule's line is
    # test_a_close_set_is_judged_by_the_accuracy_rule's, and its reference run costs most of a run
    p = matrix(
        "run",
        TINY,
        "--runs",
        "2",
        "--max-tokens",
        "8",
        "--notes",
        "ci",
        "--no-accuracy",
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    p = matrix(
        "run",
        TINY,
        "--patterns",
        "none",
        "--runs",
        "1",
        "--max-tokens",
        "8",
        "--no-accuracy",
        "--prefill-once",
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    patched, noise = L.read(ledger).entries
    assert "prefill_once" not in patched and noise["prefill_once"] is True
    assert noise["notes"] == "prompt prefilled once per set (--prefill-once)"
    assert patched["patterns"] == ["moe_router", "moe_combine"]
    assert patched["fidelity"] == "PASS" and patched["fidelity_detail"]["identical"] == 8
    assert len(patched["decode_tps"]) == len(patched["stock_decode_tps"]) == 2
    assert patched["speedup"] == patched["decode_tps_median"] / patched["stock_decode_tps_median"]
    assert patched["family"] == "glm4_moe_lite" and patched["quantization"] == "affine4/g64"
    assert patched["notes"] == "ci" and patched["versions"]["mlx"] and "commit" in patched["git"]
    assert patched["kernels_per_token"] is None and "CUDA" in patched["kernels_note"]
    assert noise["patterns"] == [] and noise["fidelity"] == "PASS"
    # what was run, how it was configured, and which path each pattern took
    assert patched["schema_version"] == 4 and patched["prompt_tokens"] == 32
    for side in ("", "stock_"):  # the host time to issue a decode step, on every backend
        assert 0 < patched[f"{side}build_ms_per_step"] <= patched[f"{side}issue_ms_per_step"]
    assert "compiled_decode" not in patched  # not among its patterns
    assert " -m zmlx.matrix run synth:glm4_moe_lite/tiny/affine4 --runs 2" in patched["command"]
    assert patched["env"] == {}
    assert set(patched["pattern_paths"]) == {"moe_router", "moe_combine"}
    assert patched["pattern_paths"]["moe_router"]["path"] == "reference"  # the CPU runs references
    assert patched["pattern_paths"]["moe_router"]["modules"] > 0
    assert patched["git"]["dirty"] in (True, False)  # the checkout is at hand: known


def test_default_ledger_is_the_users_never_the_projects(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "matrix.jsonl").write_text("")  # a repository's ledger in the current directory
    home = tmp_path / "home"
    p = matrix(
        "run",
        TINY,
        "--runs",
        "1",
        "--max-tokens",
        "4",
        "--no-accuracy",  # where the line goes is the point, not its verdict
        cwd=project,
        env={"HOME": str(home), "XDG_CACHE_HOME": ""},
    )
    assert p.returncode == 0, p.stderr
    assert (project / "matrix.jsonl").read_text() == ""
    assert len(L.read(home / ".cache" / "zmlx" / "matrix.jsonl").entries) == 1
    mine = tmp_path / "mine.jsonl"
    p = matrix("history", env={"HOME": str(home), "ZMLX_LEDGER": str(mine)})
    assert p.returncode == 0 and "0 line(s)" in p.stdout


def test_a_ledger_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    # The model does not exist: a refusal that names the ledger proves it came first.
    p = matrix("run", "/no/such/model", "--ledger", str(tmp_path))
    assert p.returncode == 2 and "is a directory" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "file").write_text("x")
    p = matrix("run", "/no/such/model", "--ledger", str(tmp_path / "file" / "m.jsonl"))
    assert p.returncode == 2 and "is a file, not a directory" in p.stderr


def test_a_stated_commit_must_exist_in_the_checkout(tmp_path):
    p = matrix(
        "run", TINY, "--ledger", str(tmp_path / "m.jsonl"), env={"ZMLX_GIT_COMMIT": "0123456789abcdef"}
    )
    assert p.returncode == 2 and "is not a commit" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_skip_ram_is_recorded_without_loading(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix("run", "synth:glm4_moe_lite/flash/affine4", "--max-memory-gb", "4", "--ledger", str(ledger))
    assert p.returncode == 0 and "SKIP(RAM)" in p.stdout
    (e,) = L.read(ledger).entries
    assert e["fidelity"] == "SKIP(RAM)" and "needs ~16.9 GB" in e["skip_reason"]
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
    base = {
        "schema": L.SCHEMA,
        "schema_version": 1,
        "family": "glm4_moe_lite",
        "quantization": "affine4/g64",
        "device": {"name": "cuda (NVIDIA H100 80GB HBM3)", "backend": "cuda"},
        "runs": 3,
        "notes": "",
    }
    rows = [
        dict(
            base,
            timestamp="2026-11-24T01:00:00+00:00",
            model="synth:flash",
            patterns=[],
            max_tokens=200,
            fidelity="PASS",
            stock_decode_tps_median=30.0,
            decode_tps_median=30.3,
            speedup=1.01,
            kernels_per_token=2400.0,
            stock_kernels_per_token=2400.0,
        ),
        dict(
            base,
            timestamp="2026-11-24T01:10:00+00:00",
            model="synth:flash",
            patterns=["moe_router"],
            max_tokens=200,
            fidelity="PASS",
            stock_decode_tps_median=30.0,
            decode_tps_median=33.0,
            speedup=1.1,
            kernels_per_token=2300.0,
            stock_kernels_per_token=2400.0,
        ),
        dict(
            base,
            timestamp="2026-11-24T01:20:00+00:00",
            model="synth:flash",
            patterns=["moe_router"],
            max_tokens=200,
            fidelity="PASS",
            stock_decode_tps_median=31.0,
            decode_tps_median=35.0,
            speedup=1.129,
            kernels_per_token=2300.0,
            stock_kernels_per_token=2400.0,
        ),
        dict(
            base,
            timestamp="2026-11-24T01:30:00+00:00",
            model="synth:other",
            patterns=["moe_router"],
            max_tokens=200,
            fidelity="SKIP(RAM)",
            skip_reason="needs ~90 GB",
        ),
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


def test_report_groups_by_prompt_and_puts_each_ratio_next_to_its_noise_floor(tmp_path):
    ledger = tmp_path / "m.jsonl"
    base = {
        "schema": L.SCHEMA,
        "schema_version": 2,
        "model": "synth:flash",
        "quantization": "affine4/g64",
        "device": {"name": "cuda (NVIDIA H200)", "backend": "cuda"},
        "runs": 5,
        "max_tokens": 200,
        "fidelity": "PASS",
        "git": {"commit": "a" * 40, "dirty": False},
    }
    lines = [
        dict(base, timestamp="2026-11-29T01:00:00+00:00", patterns=[], prompt_tokens=32, speedup=0.96),
        dict(base, timestamp="2026-11-29T01:01:00+00:00", patterns=[], prompt_tokens=32, speedup=1.02),
        dict(
            base,
            timestamp="2026-11-29T01:02:00+00:00",
            patterns=["moe_router"],
            prompt_tokens=32,
            speedup=1.03,
        ),
        dict(
            base,
            timestamp="2026-11-29T01:03:00+00:00",
            patterns=["glm47_rope"],
            prompt_tokens=32,
            speedup=1.12,
            git={"commit": "b" * 40, "dirty": None},
        ),
        dict(
            base,
            timestamp="2026-11-29T01:04:00+00:00",
            patterns=["moe_router"],
            prompt_tokens=4096,
            speedup=1.5,
        ),
    ]
    for e in lines:
        L.append(e, ledger)
    rows = json.loads(matrix("report", "--json", "--ledger", str(ledger)).stdout)
    by = {(r["prompt_tokens"], tuple(r["patterns"])): r for r in rows}
    assert set(by) == {(32, ()), (32, ("moe_router",)), (32, ("glm47_rope",)), (4096, ("moe_router",))}
    assert by[32, ("moe_router",)]["noise_floor"] == pytest.approx(0.04)
    assert by[32, ("moe_router",)]["beyond_noise"] is False
    assert by[32, ("glm47_rope",)]["beyond_noise"] is True
    assert by[4096, ("moe_router",)]["noise_floor"] is None  # another prompt length: no floor of its own
    assert by[32, ("glm47_rope",)]["commit"] == "bbbbbbb?" and by[32, ("moe_router",)]["commit"] == "aaaaaaa"
    text = matrix("report", "--ledger", str(ledger)).stdout
    assert "±4.0%: within" in text and "±4.0%: beyond" in text and "no floor" in text
    md = matrix("report", "--markdown", "--ledger", str(ledger)).stdout
    assert md.count("| " + L.line_id(lines[3]) + " |") == 1 and "4096" in md


def test_supersede_marks_a_line_without_changing_it(tmp_path):
    ledger = tmp_path / "m.jsonl"
    _fixture_ledger(ledger)
    before = ledger.read_text()
    bad = L.read(ledger).entries[2]  # the latest moe_router line
    lid = L.line_id(bad)
    p = matrix("supersede", lid[:6], "--ledger", str(ledger))
    assert p.returncode == 2 and "reason is required" in p.stderr and ledger.read_text() == before
    p = matrix("supersede", "zzzz", "--reason", "x", "--ledger", str(ledger))
    assert p.returncode == 2 and "matches no line" in p.stderr
    p = matrix("supersede", lid[:6], "--reason", "profiler attached", "--ledger", str(ledger))
    assert p.returncode == 0 and lid in p.stdout
    assert ledger.read_text().startswith(before)  # appended, nothing rewritten
    rows = json.loads(matrix("report", "--json", "--ledger", str(ledger)).stdout)
    router = next(r for r in rows if r["model"] == "synth:flash" and r["patterns"] == ["moe_router"])
    assert router["speedup"] == 1.1  # the superseded 1.129 is left out; the earlier line remains
    marked = [
        e for e in json.loads(matrix("history", "--json", "--ledger", str(ledger)).stdout) if e["superseded"]
    ]
    assert [e["line"] for e in marked] == [lid] and marked[0]["superseded"]["reason"] == "profiler attached"
    assert "SUPERSEDED" in matrix("history", "--ledger", str(ledger)).stdout
    p = matrix("supersede", lid, "--reason", "again", "--ledger", str(ledger))
    assert p.returncode == 2 and "already superseded" in p.stderr


def test_report_on_empty_ledger(tmp_path):
    p = matrix("report", "--ledger", str(tmp_path / "none.jsonl"))
    assert p.returncode == 0 and "no measurements yet" in p.stdout


def test_several_pattern_sets_share_one_control(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix(
        "run",
        TINY,
        "--patterns",
        "moe_router",
        "--patterns",
        "residual_norm",
        "--patterns",
        "none",
        "--runs",
        "2",
        "--max-tokens",
        "6",
        "--no-accuracy",  # identical tokens: PASS without the float32 reference's three runs
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    router, norm, noise = L.read(ledger).entries
    assert router["patterns"] == ["moe_router"] and norm["patterns"] == ["residual_norm"]
    assert noise["patterns"] == []
    assert router["stock_decode_tps"] == norm["stock_decode_tps"] == noise["stock_decode_tps"]
    for e in (router, norm, noise):
        assert e["fidelity"] == "PASS" and "3 sets share one control" in e["notes"]
    assert router["gpu_us_per_token"] is None


def test_a_close_set_is_judged_by_the_accuracy_rule(tmp_path):
    from zmlx.accuracy import verdict

    ledger = tmp_path / "m.jsonl"
    p = matrix(
        "run",
        TINY,
        "--patterns",
        "mla_attention",
        "--runs",
        "1",
        "--max-tokens",
        "12",
        "--accuracy",  # the flag itself (its default, on where the reference fits: test_accuracy.py)
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    p = matrix(
        "run",
        TINY,
        "--patterns",
        "mla_attention",
        "--runs",
        "1",
        "--max-tokens",
        "4",
        "--no-accuracy",
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    judged, unjudged = L.read(ledger).entries
    d = judged["fidelity_detail"]
    acc = d["accuracy"]
    assert {"ref_stock", "ref_patched", "stock_patched", "rule"} <= set(acc)  # the statistics are kept
    assert acc["ref_patched"]["kld_mean"] >= 0
    assert judged["fidelity"] == verdict(d["identical"] == d["total"], acc["accurate"])
    assert "accuracy" not in unjudged["fidelity_detail"]
    assert unjudged["fidelity"] in ("PASS", "FAIL")


def test_a_compiled_decode_line_carries_its_counters(tmp_path):
    ledger = tmp_path / "m.jsonl"
    p = matrix(
        "run",
        TINY,
        "--patterns",
        "compiled_decode",
        "--runs",
        "2",
        "--max-tokens",
        "8",
        "--no-accuracy",  # the counters are the point
        "--ledger",
        str(ledger),
    )
    assert p.returncode == 0, p.stderr
    (e,) = L.read(ledger).entries
    # 32 + 8 positions: one capacity bucket, so one trace in the run the counters come from
    assert e["compiled_decode"]["traces"] == 1 and e["compiled_decode"]["compiled_steps"] > 0
    assert e["compiled_decode"]["stock_steps"] == {}
    assert e["issue_ms_per_step"] > 0 and e["stock_issue_ms_per_step"] > 0
    assert "(1 trace)" in matrix("report", "--markdown", "--ledger", str(ledger)).stdout
