"""benchmarks/bench_glm47_flash_experiments.py end to end on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_glm47_flash_experiments.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_experiment_script_writes_a_capsule(tmp_path):
    out = tmp_path / "result.json"
    p = run(
        "--model",
        "synth:glm4_moe_lite/tiny/affine4",
        "--variants",
        "control_repeat",
        "--variants",
        "router_combine",
        "--runs",
        "1",
        "--max-tokens",
        "8",
        "--capsule-dir",
        str(tmp_path / "caps"),
        "--json-out",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    caps = list((tmp_path / "caps").glob("*.json"))
    assert len(caps) == 1
    cap = json.loads(caps[0].read_text())
    assert cap == json.loads(out.read_text())
    assert [v["name"] for v in cap["variants"]] == ["control", "control_repeat", "router_combine"]
    assert all(v["fidelity"]["verdict"] == "PASS" for v in cap["variants"])
    assert cap["params"]["allow_unsafe"] is False
    assert "router_combine" in p.stdout


@pytest.mark.slow
def test_unknown_variant_is_an_error(tmp_path):
    p = run("--variants", "nope", "--capsule-dir", str(tmp_path))
    assert p.returncode == 2 and "unknown variant(s): nope" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_kernel_microbench_writes_a_capsule_the_report_reads(tmp_path):
    script = SCRIPT.with_name("bench_kernels.py")
    # the cases of the kernels checked below (--only): the other cases' shapes cost CI minutes
    only = [
        f"--only={k}"
        for k in ("moe_router", "moe_combine", "residual_norm", "moe_mlp", "downproj_combine", "swiglu_mlp")
    ] + ["--only=glm47_rope", "--only=mla_attention"]
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            "--iters",
            "2",
            "--repeats",
            "1",
            "--capsule-dir",
            str(tmp_path),
            *only,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["kernels"]
    assert {r["kernel"] for r in rows} >= {
        "moe_router",
        "moe_combine",
        "residual_norm",
        "moe_mlp",
        "downproj_combine",
        "swiglu_mlp",
        "glm47_rope",
        "mla_attention (close)",
    }
    assert all(r["wall_us"] > 0 for r in rows)
    # on the CPU every exact kernel is its reference = stock; mla_attention's is a float32
    # computation (mla_q_prep's reference is stock's sequence, its output widened to float32)
    assert all(r["bitwise"] for r in rows if "(close)" not in r["kernel"])
    assert not any(r["bitwise"] for r in rows if r["kernel"].startswith("mla_attention"))
    p = subprocess.run([sys.executable, "-m", "zmlx.bench.report", str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and "residual_norm" in p.stdout


def test_overhead_table_shows_failed_cases():
    from rich.console import Console

    from zmlx.cli.report import overhead_table

    rows = [
        {"case": "stock op", "graph_us": 5.0, "build_us": 0.8, "eval_us": 4.2},
        {"case": "broken kernel", "error": "does not compile"},
    ]
    con = Console(width=120, record=True)
    con.print(overhead_table(rows, "overhead"))
    text = con.export_text()
    assert "5.0" in text and "4.2" in text and "failed: does not compile" in text
