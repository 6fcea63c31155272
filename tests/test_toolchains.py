"""`--require-toolchains` (CI's): a test skipped for a missing compiler fails instead."""

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

SUITE = """
import pytest

def test_emulation():
    pytest.skip("needs g++ (g++ not found)")

@pytest.mark.skipif(True, reason="needs NVRTC and MLX's CUDA headers: python -m zmlx.kernels.cuda_setup")
def test_cuda_compile():
    pass

@pytest.mark.skip(reason="needs MLX's cuda backend (this is cpu)")
def test_on_the_gpu():
    pass

@pytest.mark.xfail(reason="g++ is fine, this is an expected failure")
def test_expected_failure():
    assert False
"""


def _run(pytester, *args):
    pytester.makeconftest(CONFTEST.read_text())  # the project's own hook, not a copy of it
    pytester.makepyfile(test_suite=SUITE)
    return pytester.runpytest("-rs", *args)


def test_without_the_option_a_missing_compiler_skips(pytester):
    _run(pytester).assert_outcomes(skipped=3, xfailed=1)


def test_with_the_option_a_missing_compiler_fails_and_says_why(pytester):
    result = _run(pytester, "--require-toolchains")
    # a skip in the call fails the test; a skip mark fails its setup, which pytest counts as an error
    result.assert_outcomes(failed=1, errors=1, skipped=1, xfailed=1)
    for compiler in ("g++", "NVRTC"):
        result.stdout.fnmatch_lines(
            [f"--require-toolchains: * skipped for a missing compiler (needs {compiler}*"]
        )
    assert result.ret != 0
