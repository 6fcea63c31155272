"""mlx-lm's own model tests with every model patched first (issue 19).

mlx-lm's source distribution carries its tests (`tests/test_models.py`: each model family
built from a small config, run with and without a cache, in float32 and float16, batched,
deep-copied). `fetch` gets the sdist of the installed mlx-lm version from the package
index (pip) and unpacks its tests; `run` runs a test file under pytest in a subprocess,
stock or with the pytest plugin `zmlx.bench.mlx_lm_plugin`, which patches every model of a
family zmlx knows right after its construction (`zmlx.patch(model, patterns=...)`) and
records what each patch applied; `compare` says whether every test ended as it did stock.
Nothing of mlx-lm's is copied into zmlx: its tests are read from its own sdist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

PLUGIN = "zmlx.bench.mlx_lm_plugin"


class FetchError(RuntimeError):
    """mlx-lm's sdist could not be had (no index, or an index without sdists)."""


def cache_dir() -> Path:
    """Where `fetch` keeps the unpacked tests (zmlx's own cache folder)."""
    return Path.home() / ".cache" / "zmlx" / "mlx-lm-tests"


def fetch(dest: Path | None = None, mlx_lm_version: str | None = None) -> Path:
    """mlx-lm's `tests/` directory from its sdist (the installed version by default), unpacked
    under `dest` (default `cache_dir()`); reused when already there."""
    dest = dest or cache_dir()
    v = mlx_lm_version or version("mlx-lm")
    tests = dest / f"mlx_lm-{v}" / "tests"
    if (tests / "test_models.py").exists():
        return tests
    dest.mkdir(parents=True, exist_ok=True)
    # unpacked in a private folder, then renamed into place: two processes fetching at once
    # (pytest -n) never see a half-written file; the second rename loses and is dropped
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"mlx-lm=={v}", "--no-binary", ":all:", "--no-deps"]
        p = subprocess.run([*cmd, "-d", tmp, "-q"], capture_output=True, text=True)
        sdist = Path(tmp) / f"mlx_lm-{v}.tar.gz"
        if p.returncode != 0 or not sdist.exists():
            why = (p.stderr or p.stdout).strip()[-300:]
            raise FetchError(f"could not download mlx-lm {v}'s sdist: {why}")
        with tarfile.open(sdist) as tar:
            prefix = f"mlx_lm-{v}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            tar.extractall(tmp, members=members, filter="data")
        unpacked = Path(tmp) / f"mlx_lm-{v}" / "tests"
        if not (unpacked / "test_models.py").exists():
            raise FetchError(f"mlx-lm {v}'s sdist has no tests/test_models.py")
        tests.parent.mkdir(exist_ok=True)
        try:
            unpacked.rename(tests)
        except OSError:
            if not (tests / "test_models.py").exists():  # not another process's copy: a real error
                raise
    return tests


@dataclass
class Run:
    """One pytest run: each test's outcome by node id, and (patched) what was applied."""

    outcomes: dict[str, str]  # "passed", "failed", "error", "skipped"
    patched: list[dict] = field(default_factory=list)  # one entry per patched model (the plugin's)
    returncode: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o] = out.get(o, 0) + 1
        return out


def _outcomes(junit: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = "passed"
        for tag, word in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
            if tag in kinds:
                outcome = word
                break
        out[name] = outcome
    return out


def run(test_file: Path, patterns: str | None = None, timeout_s: float = 1800) -> Run:
    """pytest on `test_file` in a subprocess: stock when `patterns` is None, else with every
    model patched first with that selection ("default": the family's preset)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit, record = Path(tmp) / "junit.xml", Path(tmp) / "patched.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)]
        cmd += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if patterns is not None:
            cmd += ["-p", PLUGIN, f"--zmlx-patterns={patterns}", f"--zmlx-record={record}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=test_file.parent)
        if not junit.exists():
            tail = p.stdout[-2000:] + p.stderr[-2000:]
            raise RuntimeError(f"pytest wrote no report (exit {p.returncode}): {tail}")
        patched = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        return Run(_outcomes(junit), patched, p.returncode)


def compare(stock: Run, patched: Run) -> list[str]:
    """The tests whose outcome differs (one line each); empty when every test ended alike."""
    lines = []
    for name in sorted(set(stock.outcomes) | set(patched.outcomes)):
        a, b = stock.outcomes.get(name, "absent"), patched.outcomes.get(name, "absent")
        if a != b:
            lines.append(f"{name}: stock {a}, patched {b}")
    return lines
