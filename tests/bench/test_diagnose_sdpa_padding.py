"""benchmarks/gpu/diagnose_sdpa_padding.py: on the CPU, attention over the masked, padded key
buffer is bitwise the unpadded one for every op (what compiled_decode's static path relies
on); a wrong padding or mask would move the outputs by O(1). Bad input: one line, exit 2."""

import pytest
from script_loader import load_script


def _script():
    return load_script("gpu/diagnose_sdpa_padding.py")


@pytest.mark.parametrize("width,n", [(128, 11), (512, 13), (64, 1)])
def test_on_the_cpu_every_op_is_bitwise(width, n):
    row = _script().compare(width, n, heads=3, bucket=32)
    assert set(row.values()) == {"bitwise"}, row


def test_prints_a_row_per_width_and_length(capsys):
    assert _script().main(["--widths", "64", "--lengths", "3-5", "--heads", "2", "--bucket", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[2:]] == [["64", "3"], ["64", "4"], ["64", "5"]]


@pytest.mark.parametrize(
    "argv", [["--lengths", "x"], ["--widths", "0"], ["--bucket", "10", "--lengths", "9-12"], ["--heads", "0"]]
)
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert _script().main(argv) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ")
