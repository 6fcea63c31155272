"""zmlx.kernels.compact: the device code MLX gets, without comments or layout. The programs it
gives compile and run as before: the NVRTC check (test_cuda_compile.py) and every Metal
emulation test compile the compacted text; here, what it keeps and what it drops."""

import pytest

from zmlx.kernels import compact as compact_mod
from zmlx.kernels.compact import compact


def test_comments_and_layout_go():
    text = (
        "// a heading\n"
        "\n"
        "    const uint a = 1;   // trailing\n"
        "const   uint\tb = /* inline */ 2;\n"
        "/* a block\n   over lines */\n"
        "   \n"
        "uint c=a/b; // /* not a block */\n"
    )
    assert compact(text) == "const uint a = 1;\nconst uint b = 2;\nuint c=a/b;\n"


def test_a_block_comment_between_tokens_still_separates_them():
    assert compact("int/**/x;\nreturn/* r */y;\n") == "int x;\nreturn y;\n"


def test_literals_are_copied_as_they_are():
    text = (
        'asm("mma.sync  {%0, %1};  // kept" : "=r"(d));\n'
        '#define U _Pragma("unroll 8")\n'
        "const char q = '\\''; const char s = '/'; // gone\n"
        'static_assert(B, "a \\" quote // and /* this */");\n'
    )
    want = (
        'asm("mma.sync  {%0, %1};  // kept" : "=r"(d));\n'
        '#define U _Pragma("unroll 8")\n'
        "const char q = '\\''; const char s = '/';\n"
        'static_assert(B, "a \\" quote // and /* this */");\n'
    )
    assert compact(text) == want


def test_macros_keep_their_lines_and_directives_their_own_line():
    text = (
        "#ifdef ZMLX_CUDA   // the CUDA side\n"
        "#define GRID(S_)                  \\\n"
        "    const uint a = (S_); /* one */  \\\n"
        "    const uint b = a + 1;\n"
        "#endif\n"
    )
    want = "#ifdef ZMLX_CUDA\n#define GRID(S_) \\\nconst uint a = (S_); \\\nconst uint b = a + 1;\n#endif\n"
    assert compact(text) == want


def test_a_line_splice_inside_a_line_comment_continues_the_comment():
    # C joins spliced lines before it removes comments: `b` is inside the comment
    assert compact("int a; // note \\\nint b;\nint c;\n") == "int a;\nint c;\n"


def test_it_is_idempotent_and_shorter_for_commented_code():
    from zmlx.kernels.core import device_code

    for name in ("mla.h", "quant.h", "mla_q_prep_body.h", "mla_decode_fma.h"):
        text = device_code(name)
        once = compact(text)
        assert compact(once) == once and len(once) < len(text)
        assert not any(line[:1].isspace() or line.endswith(" ") for line in once.splitlines())


@pytest.mark.parametrize("bad", ["int a; /* open", 'const char* s = "open;\nint b;', "char c = 'x;"])
def test_unterminated_comments_and_literals_are_refused(bad):
    with pytest.raises(ValueError, match="unterminated"):
        compact_mod.compact.__wrapped__(bad)


def test_every_kernel_hands_mlx_the_compacted_text():
    import importlib
    import pkgutil

    import zmlx.kernels as kernels
    from zmlx.kernels.core import PRELUDE_HEADER, PRELUDE_SOURCE, KernelDef

    seen = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"zmlx.kernels.{info.name}")
        for k in vars(module).values():
            if isinstance(k, KernelDef) and k.body is not None:
                for backend in ("cuda", "metal"):
                    header, source = k.source(backend)
                    assert header == compact(PRELUDE_HEADER[backend] + k.header)
                    assert source == compact(PRELUDE_SOURCE[backend] + k.body)
                    assert "\n\n" not in header + source
                seen += 1
    assert seen >= 15


def test_zmlx_kernel_comments_hands_mlx_the_code_as_written(monkeypatch):
    from zmlx.config import ConfigError
    from zmlx.kernels.core import PRELUDE_HEADER, PRELUDE_SOURCE
    from zmlx.kernels.mla_decode_len import mla_decode_len as k

    monkeypatch.setenv("ZMLX_KERNEL_COMMENTS", "1")
    assert k.source("cuda") == (PRELUDE_HEADER["cuda"] + k.header, PRELUDE_SOURCE["cuda"] + k.body)
    monkeypatch.setenv("ZMLX_KERNEL_COMMENTS", "0")
    assert len("".join(k.source("cuda"))) < len(PRELUDE_HEADER["cuda"] + k.header)
    monkeypatch.setenv("ZMLX_KERNEL_COMMENTS", "maybe")
    with pytest.raises(ConfigError, match="ZMLX_KERNEL_COMMENTS='maybe'"):
        k.source("cuda")


def test_a_bad_kernel_comments_value_is_not_taken_for_a_broken_kernel(monkeypatch):
    """The self-check turns a kernel's build failure into the reference path; the user's
    bad setting is raised instead (it is not the kernel's fault)."""
    from zmlx.config import ConfigError
    from zmlx.kernels import core
    from zmlx.kernels.mla_decode_len import mla_decode_len as k

    core.build.cache_clear()  # a kernel built earlier in this process would not read it again
    monkeypatch.setenv("ZMLX_KERNEL_COMMENTS", "maybe")
    with pytest.raises(ConfigError):
        k._check("cuda")
