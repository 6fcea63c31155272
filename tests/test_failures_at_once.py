"""`--failures-at-once` (the GPU runs'): a failure's traceback is printed when the test
fails, before the tests after it run, so a run a time limit kills still says why."""

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

SUITE = """
def test_fails():
    assert 1 + 1 == 3, "the reason: one plus one"

def test_after():
    print("the next test runs")
"""


def _run(pytester, *args):
    pytester.makeconftest(CONFTEST.read_text())  # the project's own hook, not a copy of it
    pytester.makepyfile(test_suite=SUITE)
    return pytester.runpytest("-v", "-s", "-p", "no:cacheprovider", *args)


def test_with_the_option_the_reason_comes_before_the_next_test(pytester):
    result = _run(pytester, "--failures-at-once")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.lines
    at_once = next(i for i, line in enumerate(out) if "at once, why test_suite.py::test_fails failed" in line)
    reason = next(i for i, line in enumerate(out) if "the reason: one plus one" in line)
    after = next(i for i, line in enumerate(out) if "the next test runs" in line)
    assert at_once < reason < after


def test_without_it_the_reason_waits_for_the_end(pytester):
    result = _run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.lines
    assert not any("at once, why" in line for line in out)
    reason = next(i for i, line in enumerate(out) if "the reason: one plus one" in line)
    assert reason > next(i for i, line in enumerate(out) if "the next test runs" in line)
