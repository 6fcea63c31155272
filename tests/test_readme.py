"""The README's two commands are the ones CI and a new user run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in _commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_ci_compiles_every_cuda_body_and_fails_where_a_compiler_is_missing():
    """The test command fetches NVRTC first, and turns a skip for a missing g++ or NVRTC into a
    failure; -rs shows the skips that remain."""
    test_cmd = next(c for c in _commands() if "pytest" in c)
    setup, pytest_args = test_cmd.split(" -m pytest ")
    assert "python -m zmlx.kernels.cuda_setup" in setup
    assert {"-rs", "--require-toolchains"} <= set(pytest_args.split())


def test_readme_main_job_writes_and_validates_a_synthetic_checkpoint():
    main = _commands()[0]
    assert "zmlx.synth glm4_moe_lite" in main and "zmlx.validate" in main
    assert "pip install -e" in main


def test_readme_pattern_table_lists_every_pattern():
    from zmlx.config import flag_name
    from zmlx.patch import PATTERNS

    text = (ROOT / "README.md").read_text()
    for name, p in PATTERNS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        assert p.fidelity in row and flag_name(name) in row
