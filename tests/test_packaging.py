"""Every file the package reads at run time (device headers) ships with it: each non-Python
file under src/zmlx is matched by pyproject's package-data."""

import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from 3.11")
def test_package_data_covers_every_data_file():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    src = ROOT / "src"
    missing = []
    for f in (src / "zmlx").rglob("*"):
        if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
            continue
        package = ".".join(f.parent.relative_to(src).parts)
        if not any(fnmatch.fnmatch(f.name, g) for g in data.get(package, [])):
            missing.append(str(f.relative_to(ROOT)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
