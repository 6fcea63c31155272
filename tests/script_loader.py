"""Load a script of benchmarks/ as a module, for the tests that call its functions."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """benchmarks/<relative> (e.g. "gpu/diagnose_compiled.py") as a fresh module."""
    path = ROOT / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
