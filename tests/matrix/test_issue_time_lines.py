"""Ledger lines with the host time to issue a decode step and compiled_decode's counters
(schema 4), and older lines without them: both read, report, merge and supersede."""

import json
from types import SimpleNamespace

from typer.testing import CliRunner

from zmlx.bench.harness import CONTROL, RunNumbers, Variant, VariantResult
from zmlx.cli import matrix as matrix_cli
from zmlx.matrix import entries as E
from zmlx.matrix import ledger as L
from zmlx.matrix import summary as S

COUNTERS = {"traces": 1, "compiled_steps": 199, "stock_steps": {}}


def _result(variant, issue, build, counters=None):
    r = VariantResult(variant, runs=[RunNumbers(100.0, 30.0, 1.0, 8)], tokens=[[1] * 8])
    r.issue_ms_per_step, r.build_ms_per_step, r.compiled_decode = issue, build, counters
    r.fidelity = {"verdict": "PASS", "identical": 8, "total": 8, "first_divergence": None}
    return r


def _line(patterns, counters):
    source = SimpleNamespace(
        name="synth:flash", label=None, family="glm4_moe_lite", quantization="affine4/g64"
    )
    control = _result(CONTROL, 6.1, 4.0)
    patched = _result(Variant("p", patterns), 0.25, 0.05, counters)
    base = {"notes": "", "params": {"runs": 1, "max_tokens": 8, "prompt_tokens": 32}, "command": "x"}
    # no commit: merge refuses a stated commit that is not in this repository
    return E.measured(source, control, patched, git={"commit": None, "dirty": None}, **base)


def test_a_line_carries_issue_times_and_compiled_decodes_counters():
    e = _line(("moe_router", "compiled_decode"), COUNTERS)
    assert e["schema_version"] == L.SCHEMA_VERSION >= 4
    assert (e["stock_issue_ms_per_step"], e["issue_ms_per_step"]) == (6.1, 0.25)
    assert (e["stock_build_ms_per_step"], e["build_ms_per_step"]) == (4.0, 0.05)
    assert e["compiled_decode"] == COUNTERS
    assert "compiled_decode" not in _line(("moe_router",), None)
    assert L.validate_entry(e) is None


def test_host_time_cell():
    assert S.host_ms(_line(("compiled_decode",), COUNTERS)) == "6.10 -> 0.25 (1 trace)"
    assert S.host_ms(_line(("compiled_decode",), dict(COUNTERS, traces=3))) == "6.10 -> 0.25 (3 traces)"
    assert S.host_ms(_line(("moe_router",), None)) == "6.10 -> 0.25"
    assert S.host_ms({"speedup": 1.0}) == "-"  # a line from before schema 4


def _old_line():
    """A schema-3 line as the harness wrote it before issue times were measured."""
    e = _line(("moe_router",), None)
    for k in ("issue_ms_per_step", "stock_issue_ms_per_step", "build_ms_per_step", "stock_build_ms_per_step"):
        del e[k]
    return dict(e, schema_version=3, timestamp="2026-11-01T00:00:00+00:00", speedup=1.05)


def _cli(*args):
    result = CliRunner().invoke(matrix_cli.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_old_lines_without_the_fields_still_read_report_merge_and_supersede(tmp_path):
    ledger, other = tmp_path / "m.jsonl", tmp_path / "other.jsonl"
    old, new = _old_line(), _line(("compiled_decode",), COUNTERS)
    L.append(old, ledger)
    L.append(new, ledger)
    assert L.read(ledger).problems == [] and len(L.read(ledger).entries) == 2
    rows = {r["line"]: r for r in json.loads(_cli("report", "--json", "--ledger", ledger))}
    assert rows[L.line_id(old)]["issue_ms_per_step"] is None
    assert rows[L.line_id(new)]["stock_issue_ms_per_step"] == 6.1
    assert rows[L.line_id(new)]["compiled_decode"] == COUNTERS
    md = _cli("report", "--markdown", "--ledger", ledger)
    assert "| host ms/step |" in md
    old_row = next(line for line in md.splitlines() if L.line_id(old) in line)
    new_row = next(line for line in md.splitlines() if L.line_id(new) in line)
    assert "| 6.10 -> 0.25 (1 trace) |" in new_row and "| - | " + S.commit_label(old) in old_row
    for command in ("report", "history"):  # terminal tables: a narrow column wraps the cell
        assert "6.10 ->" in _cli(command, "--ledger", ledger)
    assert "merged 2 line(s)" in _cli("merge", ledger, "--ledger", other)
    assert L.read(other).entries == [old, new]
    only_old = tmp_path / "old.jsonl"
    L.append(old, only_old)
    for command in ("report", "history"):  # a table of older lines keeps its width
        assert "host" not in _cli(command, "--ledger", only_old)
    assert "| host ms/step |" in _cli("report", "--markdown", "--ledger", only_old)
    _cli("supersede", L.line_id(old), "--reason", "test", "--ledger", ledger)
    assert [r["line"] for r in json.loads(_cli("report", "--json", "--ledger", ledger))] == [L.line_id(new)]


def test_the_speedup_cell_gives_the_runs_lowest_and_highest_paired_ratio():
    e = {"decode_tps": [60.0, 40.0, 66.0], "stock_decode_tps": [40.0, 40.0, 44.0], "speedup": 1.5}
    assert S.run_ratios(e) == (1.0, 1.5)
    assert S.speedup_cell({"speedup": 1.5, "run_ratios": S.run_ratios(e)}) == "1.500 (1.00-1.50)"
    # one run, unequal lists or no lists (old lines): the medians' ratio alone
    for bad in (
        {"decode_tps": [60.0], "stock_decode_tps": [40.0]},
        {"decode_tps": [60.0, 50.0], "stock_decode_tps": [40.0]},
        {},
    ):
        assert S.run_ratios(bad) is None
    assert S.speedup_cell({"speedup": 1.5, "run_ratios": None}) == "1.500"
    assert S.speedup_cell({"speedup": None, "run_ratios": (1.0, 2.0)}) == "-"


def test_each_set_is_kept_as_soon_as_it_is_judged(tmp_path, monkeypatch):
    """The accuracy rule judges the sets one after another, after every timed run: a set's
    line is appended when its verdict is in, so a run stopped during a later set's judgement
    (a time limit) keeps what it measured."""
    import zmlx.accuracy

    judged = []

    def judge(model, prompt, tokens, *, patterns, also):
        judged.append(patterns)
        if len(judged) == 2:
            raise KeyboardInterrupt  # stopped during the second set's judgement
        return SimpleNamespace(accurate=True, to_dict=lambda: {"accurate": True, "reasons": []})

    monkeypatch.setattr(zmlx.accuracy, "accuracy", judge)
    ledger = tmp_path / "m.jsonl"
    args = ["run", "synth:glm4_moe_lite/tiny/affine4", "--patterns", "moe_router", "--patterns",
            "moe_combine", "--runs", "1", "--max-tokens", "4", "--accuracy", "--ledger", ledger]  # fmt: skip
    result = CliRunner().invoke(matrix_cli.app, [str(a) for a in args])
    assert result.exit_code != 0 and len(judged) == 2
    lines = L.read(ledger).entries
    assert [e["patterns"] for e in lines] == [["moe_router"]]
    assert lines[0]["fidelity"] == "PASS" and lines[0]["fidelity_detail"]["accuracy"]["accurate"]
