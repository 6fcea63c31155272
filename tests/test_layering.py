"""The layout's rules, checked: the library imports no command-line code (every command
lives in zmlx.cli), a pattern imports no other pattern (what two share is a public module
of zmlx.patch), and every documented `python -m` entry point still answers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zmlx"

# The library: everything but the commands (zmlx.cli), the `python -m` shims and the
# console helpers the commands share.
LIBRARY = sorted(
    ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
    for p in SRC.rglob("*.py")
    if "cli" not in p.relative_to(SRC).parts
    and p.name != "__main__.py"
    and p.name != "ui.py"
    and "cuda_setup" not in p.name  # a setup program of its own (python -m zmlx.kernels.cuda_setup)
)


def _imports(path: Path) -> set[str]:
    """Modules a file imports at any depth (inside functions too), but not those under
    `if __name__ == "__main__":` (a `python -m` entry point's call into zmlx.cli)."""
    tree = ast.parse(path.read_text())
    main_blocks = {
        id(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) and "__name__" in ast.unparse(n.test)
    }
    out: set[str] = set()

    def visit(node):
        if id(node) in main_blocks:
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _path(module: str) -> Path:
    p = SRC.parent.joinpath(*module.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_imports_no_command_line_code(module):
    bad = sorted(m for m in _imports(_path(module)) if m == "typer" or m.startswith(("zmlx.cli", "zmlx.ui")))
    assert not bad, f"{module} imports {bad}: commands and their rendering belong in zmlx.cli"


def test_the_library_loads_without_typer():
    """Importing the library modules pulls in neither typer nor zmlx.cli."""
    code = (
        "import importlib, sys\n"
        f"for m in {LIBRARY!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'typer' or m.startswith('zmlx.cli'))\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("path", sorted((SRC / "patch" / "patterns").glob("*.py")), ids=lambda p: p.name)
def test_a_pattern_imports_no_other_pattern(path):
    if path.name == "__init__.py":  # the registry imports them all
        return
    others = sorted(m for m in _imports(path) if m.startswith("zmlx.patch.patterns"))
    assert not others, f"{path.name} imports {others}: move what they share into a module of zmlx.patch"


ENTRY_POINTS = [
    ["zmlx"],
    ["zmlx.cli"],
    ["zmlx.validate"],
    ["zmlx.synth"],
    ["zmlx.matrix"],
    ["zmlx.matrix", "run"],
    ["zmlx.bench.drift"],
    ["zmlx.bench.report"],
]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=" ".join)
def test_every_documented_entry_point_answers_help(entry):
    p = subprocess.run([sys.executable, "-m", *entry, "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Usage:" in p.stdout and "Traceback" not in p.stderr


def test_no_module_is_over_400_lines():
    """A module a reader can hold in mind: device code lives in kernels/csrc, CLI apart from
    library; a module that grows past this is split, not stretched."""
    long = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"over 400 lines: {long}"


def test_no_two_test_modules_share_a_name():
    # pytest imports test modules by their basename (rootdir-relative "prepend" mode, no
    # __init__.py): two files of one name make the second fail to collect
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1]
