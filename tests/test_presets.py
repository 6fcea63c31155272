"""Presets: patch(model) stays exact; preset="fast" (ZMLX_PRESET=fast) adds the close patterns a
family lists in `fast_on`, and every such entry names a current ledger line that shows it
ACCURATE for that family, backend and pattern (the package has no ledger at run time, so this
test is what keeps the data honest)."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import pytest

import zmlx
from zmlx import synth
from zmlx.config import PRESETS, ConfigError, PatchConfig
from zmlx.families import FAMILIES, Family
from zmlx.matrix import ledger as L
from zmlx.patch import PATTERNS, select_patterns

REPO_LEDGER = Path(__file__).resolve().parents[1] / "matrix.jsonl"
FAMILY = "glm4_moe_lite"


def unbacked(families: dict[str, Family], ledger: L.Ledger) -> list[str]:
    """Each (family, backend, pattern) in a family's `fast_on` that no current ACCURATE line
    of `ledger` for that family, backend and pattern backs, with why."""
    current = {L.line_id(e): e for e in ledger.current()}
    problems = []
    for name, fam in families.items():
        for backend, evidence in fam.fast_on.items():
            for pattern, line in evidence.items():
                where = f"{name}/{backend}/{pattern} (line {line})"
                entry = current.get(line)
                if pattern not in PATTERNS or pattern not in fam.targets:
                    problems.append(f"{where}: not a pattern of {name}")
                elif PATTERNS[pattern].fidelity_on(backend) == "exact":
                    problems.append(f"{where}: exact on {backend}, belongs in the default preset")
                elif entry is None:
                    why = "superseded" if line in ledger.superseded else "not in the ledger"
                    problems.append(f"{where}: {why}")
                elif entry.get("fidelity") != "ACCURATE":
                    problems.append(f"{where}: fidelity {entry.get('fidelity')}, not ACCURATE")
                elif entry.get("family") != name:
                    problems.append(f"{where}: a line of {entry.get('family')}")
                elif (entry.get("device") or {}).get("backend") != backend:
                    problems.append(f"{where}: a line on {(entry.get('device') or {}).get('backend')}")
                elif pattern not in entry.get("patterns", ()):
                    problems.append(f"{where}: the line measured {entry.get('patterns')}")
    return problems


def test_every_fast_pattern_is_backed_by_a_current_accurate_ledger_line():
    assert REPO_LEDGER.exists()
    assert unbacked(FAMILIES, L.read(REPO_LEDGER)) == []


def _line(fidelity="ACCURATE", family=FAMILY, backend="cuda", patterns=("mla_attention",)):
    return {
        "schema": L.SCHEMA,
        "schema_version": L.SCHEMA_VERSION,
        "timestamp": "t",
        "model": "synth:glm4_moe_lite/tiny/affine4",
        "family": family,
        "patterns": list(patterns),
        "device": {"name": backend, "backend": backend},
        "fidelity": fidelity,
    }


def test_the_check_refuses_every_kind_of_unbacked_entry(tmp_path):
    path = tmp_path / "matrix.jsonl"
    lines = {
        "good": _line(),
        "pass": _line(fidelity="PASS"),
        "fail": _line(fidelity="FAIL"),
        "family": _line(family="deepseek_v3"),
        "backend": _line(backend="metal"),
        "emulated": _line(backend="metal-emulated"),  # matrix run --emulate-metal: not a Metal device
        "pattern": _line(patterns=("moe_router",)),
        "old": {**_line(), "notes": "taken with a bad harness"},
    }
    for entry in lines.values():
        L.append(entry, path)
    ids = {k: L.line_id(e) for k, e in lines.items()}
    L.supersede(path, [ids["old"]], "bad harness", "t")
    ledger = L.read(path)
    base = FAMILIES[FAMILY]

    def check(line_key=None, backend="cuda", pattern="mla_attention", line=None):
        fam = dataclasses.replace(base, fast_on={backend: {pattern: line or ids[line_key]}})
        return unbacked({FAMILY: fam}, ledger)

    assert check("good") == []
    assert "not ACCURATE" in check("pass")[0] and "not ACCURATE" in check("fail")[0]
    assert "a line of deepseek_v3" in check("family")[0]
    assert "a line on metal" in check("backend")[0]
    assert "a line on metal-emulated" in check("emulated", backend="metal")[0]
    assert "the line measured" in check("pattern")[0]
    assert "superseded" in check("old")[0]
    assert "not in the ledger" in check(line="0123456789")[0]
    assert "belongs in the default preset" in check("good", pattern="moe_router")[0]
    # the real ledger file reads the same way (a JSON line as matrix run writes it)
    assert json.loads(path.read_text().splitlines()[0])["fidelity"] == "ACCURATE"


def test_fast_equals_default_while_no_line_says_accurate():
    for fam in FAMILIES.values():
        for backend in ("cpu", "cuda", "metal"):
            if not fam.fast_on.get(backend):
                assert fam.preset_named("fast", backend) == fam.preset_on(backend)


@pytest.fixture
def no_fast(monkeypatch):
    """The family as if no ledger line said ACCURATE."""
    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    return fam


@pytest.fixture
def fast_mla(monkeypatch):
    """The family as if the ledger showed mla_attention ACCURATE on the CPU."""
    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={"cpu": {"mla_attention": "0123456789"}})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    return fam


def test_select_patterns_takes_the_preset(fast_mla):
    cfg = PatchConfig()
    default = select_patterns(FAMILY, None, None, cfg, "cpu")[0]
    assert "mla_attention" not in default
    # (in registry order; compared as sets: another test's monkeypatch may reorder the registry)
    fast = select_patterns(FAMILY, None, None, cfg, "cpu", preset="fast")[0]
    assert set(fast) == {*default, "mla_attention"}
    # ZMLX_PRESET picks it when the argument is absent; the argument wins over it
    env = PatchConfig.from_env({"ZMLX_PRESET": "fast"})
    assert "mla_attention" in select_patterns(FAMILY, None, None, env, "cpu")[0]
    assert select_patterns(FAMILY, None, None, env, "cpu", preset="default")[0] == default
    # only on the backend whose ledger line says so
    assert (
        select_patterns(FAMILY, None, None, cfg, "cuda", preset="fast")[0]
        == (select_patterns(FAMILY, None, None, cfg, "cuda")[0])
    )
    # explicit patterns win over the preset; exclude and flags still apply to it
    assert select_patterns(FAMILY, "moe_router", None, cfg, "cpu", preset="fast")[0] == ["moe_router"]
    assert "mla_attention" not in select_patterns(FAMILY, None, "mla_attention", cfg, "cpu", preset="fast")[0]
    off = PatchConfig.from_env({"ZMLX_MLA_ATTENTION": "0"})
    chosen, why = select_patterns(FAMILY, None, None, off, "cpu", preset="fast")
    assert "mla_attention" not in chosen and why["mla_attention"] == "ZMLX_MLA_ATTENTION=0"
    assert select_patterns(FAMILY, None, None, cfg, "cpu")[1]["mla_attention"] == (
        "not in the default preset on cpu"
    )
    assert select_patterns(FAMILY, None, None, cfg, "cpu", preset="fast")[1]["residual_norm"] == (
        "not in the fast preset on cpu"
    )


@pytest.mark.parametrize("bad", ["Fast", "exact", "accurate"])
def test_an_unknown_preset_is_an_error_naming_the_valid_ones(bad):
    valid = ", ".join(PRESETS)
    with pytest.raises(ConfigError, match=f"unknown preset '{bad}' in preset; valid: {valid}"):
        select_patterns(FAMILY, None, None, PatchConfig(), "cpu", preset=bad)
    with pytest.raises(ConfigError, match=f"in ZMLX_PRESET; valid: {valid}"):
        PatchConfig.from_env({"ZMLX_PRESET": bad})
    assert PatchConfig.from_env({"ZMLX_PRESET": ""}).preset is None  # empty counts as unset


@pytest.fixture(scope="module")
def model():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield synth.build("synth:glm4_moe_lite/tiny/affine4")[0]
    mx.set_default_device(before)


def _applied(result):
    return [n for n, r in result.patterns.items() if r.patched]


def test_patch_stays_exact_by_default_and_fast_says_it_added_nothing(model, no_fast):
    default = zmlx.patch(model, config=PatchConfig())
    assert default.preset == "default" and default.close == []
    assert "preset default" in str(default) and "every applied pattern is exact" in str(default)
    applied = _applied(default)
    fast = zmlx.patch(model, preset="fast", config=PatchConfig())
    assert _applied(fast) == applied and fast.preset == "fast"
    assert "no close pattern is ACCURATE on cpu in the ledger yet" in fast.preset_note
    assert "preset=fast" in str(fast) and fast.preset_note in str(fast)
    assert fast.to_dict()["preset"] == "fast"
    zmlx.unpatch(model)


def test_patch_fast_applies_and_names_the_close_patterns(model, fast_mla):
    result = zmlx.patch(model, preset="fast", config=PatchConfig())
    assert "mla_attention" in _applied(result)
    assert result.patterns["mla_attention"].fidelity == "close" and result.close == ["mla_attention"]
    assert "adds mla_attention" in result.preset_note
    text = str(result)
    assert "close (not bitwise stock on cpu" in text and "mla_attention (close)" in text
    caption = str(result.table().caption)
    assert "preset fast" in caption and "mla_attention" in caption
    # ZMLX_PRESET does the same; explicit patterns record no preset
    by_env = zmlx.patch(model, config=PatchConfig.from_env({"ZMLX_PRESET": "fast"}))
    assert by_env.preset == "fast" and "mla_attention" in _applied(by_env)
    explicit = zmlx.patch(model, patterns="moe_router", preset="fast", config=PatchConfig())
    assert explicit.preset is None and _applied(explicit) == ["moe_router"]
    assert "explicit patterns" in str(explicit)
    zmlx.unpatch(model)


def test_the_preset_travels_with_the_pickle(model, fast_mla):
    import pickle

    result = zmlx.patch(model, preset="fast", config=PatchConfig())
    loaded = pickle.loads(pickle.dumps(model))
    assert zmlx.patch_result(loaded).to_dict() == result.to_dict()
    assert zmlx.patch_result(loaded).preset == "fast"
    assert type(loaded.model.layers[0].self_attn) is type(model.model.layers[0].self_attn)
    zmlx.unpatch(model)


TINY = "synth:glm4_moe_lite/tiny/affine4"


@pytest.mark.parametrize("command", [["drift", TINY], ["matrix", "run", TINY]])
def test_an_unknown_preset_option_is_one_line_and_exit_2(command, tmp_path):
    from typer.testing import CliRunner

    from zmlx.cli import app

    ledger = ["--ledger", str(tmp_path / "m.jsonl")] if command[0] == "matrix" else []
    result = CliRunner().invoke(app, [*command, "--preset", "quick", *ledger])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: unknown preset 'quick' in --preset; valid: default, fast"
    assert not (tmp_path / "m.jsonl").exists()


def test_drift_takes_the_preset(monkeypatch, no_fast):
    from typer.testing import CliRunner

    from zmlx.cli import app

    args = ["drift", TINY, "--steps", "1", "--prompt-tokens", "4", "--json", "--preset", "fast"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "mla_attention" not in json.loads(plain.stdout)["patterns"]
    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={"cpu": {"mla_attention": "0123456789"}})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    fast = CliRunner().invoke(app, args)
    assert fast.exit_code == 0, fast.output
    assert "mla_attention" in json.loads(fast.stdout)["patterns"]


def test_the_patterns_command_shows_the_fast_preset(monkeypatch, no_fast):
    from typer.testing import CliRunner

    from zmlx.cli import app

    monkeypatch.setenv("COLUMNS", "250")
    out = CliRunner().invoke(app, ["patterns"]).stdout
    assert "fast adds" in out and "no close pattern is ACCURATE in the ledger yet" in out
    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={"cuda": {"mla_attention": "0123456789"}})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    out = CliRunner().invoke(app, ["patterns"]).stdout
    (row,) = [line for line in out.splitlines() if "mla_attention" in line]
    assert row.rstrip(" │").endswith("glm4_moe_lite (cuda)")


def test_matrix_run_takes_the_preset(monkeypatch, tmp_path):
    """A set without --patterns is the preset's: here recorded without loading (SKIP(RAM))."""
    from typer.testing import CliRunner

    from zmlx import backend
    from zmlx.cli import app

    fam = dataclasses.replace(FAMILIES[FAMILY], fast_on={backend.current(): {"mla_attention": "0123456789"}})
    monkeypatch.setitem(FAMILIES, FAMILY, fam)
    ledger = tmp_path / "m.jsonl"
    for preset in ("default", "fast"):
        args = ["matrix", "run", TINY, "--preset", preset, "--max-memory-gb", "1e-6", "--ledger", str(ledger)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    default, fast = (e["patterns"] for e in L.read(ledger).entries)
    assert "mla_attention" not in default and set(fast) == {*default, "mla_attention"}


def test_the_accuracy_rule_judges_what_the_preset_applies(model, fast_mla, monkeypatch):
    from zmlx import accuracy

    seen = []

    def compare(m, ids, tokens, apply, also=()):  # the patched side only: what apply() patches
        undo = apply(m)
        seen.append(_applied(zmlx.patch_result(m)))
        undo()

    monkeypatch.setattr(accuracy, "compare", compare)
    accuracy.accuracy(model, [1, 2], [3], preset="fast")
    accuracy.accuracy(model, [1, 2], [3])
    assert "mla_attention" in seen[0] and "mla_attention" not in seen[1]
    assert not zmlx.is_patched(model)


def test_a_bad_preset_variable_is_one_line_and_exit_2(monkeypatch):
    from typer.testing import CliRunner

    from zmlx.cli import app

    monkeypatch.setenv("ZMLX_PRESET", "quick")
    result = CliRunner().invoke(app, ["drift", TINY, "--steps", "1", "--prompt-tokens", "4"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: unknown preset 'quick' in ZMLX_PRESET; valid: default, fast"
