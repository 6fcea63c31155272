"""zmlx.config: the one pattern-selection grammar, the environment's rules, the ledger path."""

from pathlib import Path

import pytest

from zmlx.config import NOT_FLAGS, ConfigError, PatchConfig, default_ledger_path, parse_selection


@pytest.mark.parametrize(
    "value,names",
    [
        (None, None),  # not given: the preset
        ("none", ()),
        ("NONE", ()),
        (" none ", ()),
        ("moe_router", ("moe_router",)),  # a single name is one name, not its characters
        ("moe_router, moe_combine", ("moe_router", "moe_combine")),
        ("moe_router,,moe_combine,", ("moe_router", "moe_combine")),
        (["moe_router"], ("moe_router",)),
        (("moe_router", "moe_combine"), ("moe_router", "moe_combine")),
        (["none"], ()),
        ([], ()),
        ((), ()),
    ],
)
def test_the_selection_grammar(value, names):
    assert parse_selection(value, "--patterns") == names


@pytest.mark.parametrize("value", ["", ",", " ", " , ", [""], [" ", ","]])
def test_an_empty_selection_is_an_error_that_names_none(value):
    with pytest.raises(ConfigError, match=r"empty pattern list in --patterns .*use none for no patterns"):
        parse_selection(value, "--patterns")


def test_none_does_not_combine_with_names():
    with pytest.raises(ConfigError, match="none means no patterns"):
        parse_selection("none,moe_router", "ZMLX_PATTERNS")


def test_names_must_be_strings():
    with pytest.raises(ConfigError, match="must be strings"):
        parse_selection([1, 2], "patterns")


def test_the_environment_uses_the_same_grammar():
    assert PatchConfig.from_env({"ZMLX_PATTERNS": "moe_router"}).patterns == ("moe_router",)
    assert PatchConfig.from_env({"ZMLX_PATTERNS": "none"}).patterns == ()
    assert PatchConfig.from_env({"ZMLX_EXCLUDE": "none"}).exclude == ()
    assert PatchConfig.from_env({"ZMLX_EXCLUDE": "moe_router,moe_combine"}).exclude == (
        "moe_router",
        "moe_combine",
    )
    for name in ("ZMLX_PATTERNS", "ZMLX_EXCLUDE"):
        with pytest.raises(ConfigError, match=f"empty pattern list in {name}"):
            PatchConfig.from_env({name: ","})


def test_an_empty_variable_counts_as_unset():
    """`ZMLX_PATTERNS= cmd` is how a shell unsets a variable for one command."""
    cfg = PatchConfig.from_env({"ZMLX_PATTERNS": "", "ZMLX_EXCLUDE": ""})
    assert cfg.patterns is None and cfg.exclude == ()
    assert default_ledger_path({"ZMLX_LEDGER": "", "HOME": "/home/u"}) == Path(
        "/home/u/.cache/zmlx/matrix.jsonl"
    )


def test_default_ledger_path():
    assert default_ledger_path({"ZMLX_LEDGER": "/data/m.jsonl", "XDG_CACHE_HOME": "/c"}) == Path(
        "/data/m.jsonl"
    )
    assert default_ledger_path({"ZMLX_LEDGER": "~/m.jsonl", "HOME": "/home/u"}) == (
        Path("~/m.jsonl").expanduser()
    )
    assert default_ledger_path({"XDG_CACHE_HOME": "/c", "HOME": "/home/u"}) == Path("/c/zmlx/matrix.jsonl")
    assert default_ledger_path({"HOME": "/home/u"}) == Path("/home/u/.cache/zmlx/matrix.jsonl")
    # never the current directory's ledger
    assert default_ledger_path({}).is_absolute()


def test_the_ledger_variable_is_not_a_pattern_flag():
    assert "ZMLX_LEDGER" in NOT_FLAGS
    assert PatchConfig.from_env({"ZMLX_LEDGER": "/x.jsonl"}).flags == {}


def test_a_bad_kernel_comments_value_is_refused_when_the_config_is_read():
    """ZMLX_KERNEL_COMMENTS is read where kernels are built (on the CPU none is): PatchConfig
    refuses a bad value up front, so `zmlx.patch` and the CLIs say so in one line."""
    assert PatchConfig.from_env({"ZMLX_KERNEL_COMMENTS": "1"}).flags == {}
    with pytest.raises(ConfigError, match="ZMLX_KERNEL_COMMENTS='maybe'"):
        PatchConfig.from_env({"ZMLX_KERNEL_COMMENTS": "maybe"})
