"""Device code without its comments and layout: the text every KernelDef hands to MLX.

Made because MLX's CUDA custom kernel rebuilds a kernel's whole source into a new string at
every call of the kernel function (mlx/backend/cuda/custom_kernel.cpp, 0.32), and most of
our text is csrc/'s comments (benchmarks/kernel_source_bytes.py counts the bytes). Measured
on the H200 (profile_host.py --ab comments, then called --comments-ab; NOTEBOOK, eighth
session), compacted and written sources issue a decode step in the same host time: the
length is not where a launch's host time goes. The comments stay in csrc/ for readers; MLX,
NVRTC, Metal and the emulation get the same code without them (ZMLX_KERNEL_COMMENTS=1: as
written).

`compact` removes `//` and `/* */` comments (a block comment becomes one space, as in C),
leading and trailing blanks, runs of blanks inside a line and empty lines; string and
character literals are copied as they are, and so are line splices (a backslash ending a
line), so a macro keeps its lines. Preprocessor directives keep a line of their own. The
result compiles to the same program: the CI's NVRTC check and Metal emulation compile this
text, and the `cuda` tests run it.
"""

from __future__ import annotations

import functools

_BLANK = " \t\f\v\r"


@functools.cache
def compact(text: str) -> str:
    """`text` without comments, blank runs and empty lines (see the module doc). ValueError
    for an unterminated comment or literal."""
    out: list[str] = []
    i, n = 0, len(text)

    def end_line() -> None:
        while out and out[-1] == " ":
            out.pop()
        if out and out[-1] != "\n":
            out.append("\n")

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            # to the end of the line; a line splice inside the comment continues it (C's
            # translation phase 2 joins the lines before comments are removed)
            while i < n and text[i] != "\n":
                i += 2 if text.startswith("\\\n", i) else 1
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment in device code")
            if out and out[-1] not in " \n":
                out.append(" ")
            i = j + 2
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                if text[j] == "\n":
                    raise ValueError(f"unterminated {c} literal in device code")
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"unterminated {c} literal in device code")
            out.append(text[i : j + 1])
            i = j + 1
            continue
        if c == "\n":
            end_line()
        elif c in _BLANK:
            if out and out[-1] not in " \n":
                out.append(" ")
        else:
            out.append(c)
        i += 1
    end_line()
    return "".join(out)
