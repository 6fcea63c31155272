"""The ledger: schema-versioned lines, locked appends, bad lines skipped with their number."""

import json
import multiprocessing

import pytest

from zmlx.matrix import ledger as L


def entry(model="m", patterns=("moe_router",), speed=1.1, **extra):
    e = {
        "schema": L.SCHEMA,
        "schema_version": L.SCHEMA_VERSION,
        "timestamp": "2026-11-24T00:00:00+00:00",
        "model": model,
        "patterns": list(patterns),
        "device": {"name": "cpu (x)", "backend": "cpu"},
        "fidelity": "PASS",
        "speedup": speed,
    }
    e.update(extra)
    return e


def test_round_trip(tmp_path):
    path = tmp_path / "matrix.jsonl"
    L.append(entry(), path)
    L.append(entry(model="other"), path)
    data = L.read(path)
    assert data.problems == [] and [e["model"] for e in data.entries] == ["m", "other"]
    assert path.read_text().count("\n") == 2
    assert [e["model"] for e in L.select(data.entries, "OTH")] == ["other"]


def test_missing_ledger_reads_empty(tmp_path):
    assert L.read(tmp_path / "none.jsonl").entries == []


def test_bad_lines_are_reported_with_their_number_and_skipped(tmp_path):
    path = tmp_path / "matrix.jsonl"
    L.append(entry(model="first"), path)
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"schema": "other"}) + "\n")
        f.write(json.dumps(entry(schema_version=L.SCHEMA_VERSION + 1)) + "\n")
        f.write(json.dumps({k: v for k, v in entry().items() if k != "device"}) + "\n")
    L.append(entry(model="last"), path)
    data = L.read(path)
    assert [e["model"] for e in data.entries] == ["first", "last"]
    assert [p.split(":")[0] for p in data.problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert "upgrade zmlx" in data.problems[2] and "missing device" in data.problems[3]


def test_a_torn_last_line_does_not_swallow_the_next(tmp_path):
    path = tmp_path / "matrix.jsonl"
    L.append(entry(model="a"), path)
    with open(path, "a") as f:
        f.write('{"schema": "zmlx.matr')  # a crash mid-write
    L.append(entry(model="b"), path)
    data = L.read(path)
    assert [e["model"] for e in data.entries] == ["a", "b"] and data.problems[0].startswith("line 2")


def test_append_refuses_what_would_not_read_back(tmp_path):
    with pytest.raises(L.LedgerError, match="missing"):
        L.append({"schema": L.SCHEMA, "schema_version": 1}, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def _writer(path, tag, n):
    for i in range(n):
        L.append(entry(model=f"{tag}-{i}", notes="x" * 5000), path)


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "matrix.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 150)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = L.read(path)
    assert data.problems == []
    assert sorted(e["model"] for e in data.entries) == sorted(f"{t}-{i}" for t in "ab" for i in range(150))


def test_merge_appends_new_lines_once(tmp_path):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    L.append(entry(model="common"), here)
    L.append(entry(model="common"), there)
    L.append(entry(model="gpu"), there)
    with open(there, "a") as f:
        f.write("junk\n")
    n, problems = L.merge(there, here)
    assert n == 1 and problems == ["line 3: not JSON (Expecting value)"]
    assert L.merge(there, here)[0] == 0
    assert [e["model"] for e in L.read(here).entries] == ["common", "gpu"]


def test_line_ids_are_stable_and_tell_lines_apart():
    a, b = entry(model="a"), entry(model="b")
    assert L.line_id(a) == L.line_id(dict(reversed(list(a.items()))))  # key order does not matter
    assert L.line_id(a) != L.line_id(b) and len(L.line_id(a)) == 10


def test_supersede_appends_a_mark_and_read_sets_the_line_aside(tmp_path):
    path = tmp_path / "m.jsonl"
    L.append(entry(model="bad"), path)
    L.append(entry(model="good"), path)
    bad = L.line_id(L.read(path).entries[0])
    with pytest.raises(L.LedgerError, match="reason"):
        L.supersede(path, [bad], " ", "2026-11-29T00:00:00+00:00")
    with pytest.raises(L.LedgerError, match="no line"):
        L.supersede(path, ["ffffffffff"], "why", "2026-11-29T00:00:00+00:00")
    assert L.supersede(path, [bad[:4]], "harness bug", "2026-11-29T00:00:00+00:00") == [bad]
    data = L.read(path)
    assert [e["model"] for e in data.entries] == ["bad", "good"]  # history keeps both
    assert [e["model"] for e in data.current()] == ["good"]
    assert data.superseded[bad]["reason"] == "harness bug"


def test_merge_refuses_lines_whose_commit_is_not_in_the_repository(tmp_path):
    here, there = tmp_path / "here.jsonl", tmp_path / "there.jsonl"
    L.append(entry(model="known", git={"commit": "abc", "dirty": None}), there)
    L.append(entry(model="unknown", git={"commit": "fff", "dirty": None}), there)
    L.append(entry(model="no commit", git={"commit": None, "dirty": None}), there)
    L.supersede(there, [L.line_id(L.read(there).entries[0])], "bad harness", "2026-11-29T00:00:00+00:00")
    n, problems = L.merge(there, here, commit_exists=lambda sha: sha == "abc")
    assert n == 3 and len(problems) == 1 and "commit fff is not in this repository" in problems[0]
    data = L.read(here)
    assert [e["model"] for e in data.entries] == ["known", "no commit"] and len(data.superseded) == 1
    assert L.merge(there, here, commit_exists=lambda sha: sha == "abc")[0] == 0  # the mark too, once


def test_check_writable_refuses_directories_and_paths_under_files(tmp_path):
    with pytest.raises(L.LedgerPathError, match="is a directory"):
        L.check_writable(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(L.LedgerPathError, match="is a file"):
        L.check_writable(tmp_path / "f" / "sub" / "m.jsonl")
    assert L.check_writable(tmp_path / "new" / "m.jsonl") == tmp_path / "new" / "m.jsonl"
    assert not (tmp_path / "new").exists()  # checking creates nothing
