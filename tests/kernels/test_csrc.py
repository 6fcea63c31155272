"""Device code lives in files under kernels/csrc/, not in Python strings: each kernel module
keeps its reference, its launch and at most a short body, and says in its docstring which
csrc files hold the rest (a reader goes from a pattern's name to its device code there)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import zmlx.kernels
from zmlx.kernels.core import PRELUDE_HEADER, KernelDef, device_code

KERNELS = Path(zmlx.kernels.__file__).parent
CSRC = sorted(p.name for p in (KERNELS / "csrc").iterdir() if p.suffix == ".h")
# the longest piece of device code a kernel module may keep inline (a short body)
MAX_INLINE_LINES = 30


def _kernel_modules():
    for m in pkgutil.iter_modules(zmlx.kernels.__path__):
        mod = importlib.import_module(f"zmlx.kernels.{m.name}")
        defs = [v for v in vars(mod).values() if isinstance(v, KernelDef)]
        if defs:
            yield mod, defs


MODULES = list(_kernel_modules())


def test_device_code_is_the_files_text_in_order():
    quant, expert_sum = ((KERNELS / "csrc" / n).read_text() for n in ("quant.h", "expert_sum.h"))
    assert device_code("quant.h", "expert_sum.h") == quant + expert_sum
    assert "zmlx_qdot_lane" in quant and "ZmlxExpertSum" in expert_sum


@pytest.mark.parametrize("mod,defs", MODULES, ids=[m.__name__.rsplit(".", 1)[-1] for m, _ in MODULES])
def test_a_kernel_module_names_the_csrc_files_it_loads(mod, defs):
    used = {n for n in CSRC for k in defs if device_code(n) in k.header + (k.body or "")}
    missing = [n for n in sorted(used) if f"csrc/{n}" not in mod.__doc__]
    assert not missing, f"{mod.__name__}'s docstring does not name {missing}"


def test_every_csrc_file_is_loaded_by_a_kernel():
    # as written, before compaction (zmlx.kernels.compact); the preludes come with source()
    sources = [
        p + k.header + (k.body or "") for _, ks in MODULES for k in ks for p in PRELUDE_HEADER.values()
    ]
    unused = [n for n in CSRC if not any(device_code(n) in s for s in sources)]
    assert not unused, f"csrc files no KernelDef loads: {unused}"


def _device_strings(path: Path):
    """(line, lines) of each string constant in a module that holds device code (a statement
    ends with ';' or a preprocessor line), docstrings excepted."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if ";\n" in text or "\n#" in text:
                yield node.lineno, text.count("\n")


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_no_kernel_module_keeps_long_device_code_inline(path):
    long = [(line, n) for line, n in _device_strings(path) if n > MAX_INLINE_LINES]
    assert not long, f"{path.name}: device code of {long} (line, lines) belongs in csrc/"
