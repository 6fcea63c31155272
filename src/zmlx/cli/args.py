"""The argument checks every zmlx command shares (validate, drift, matrix run), so that the
same bad input gets the same one-line error and exit status 2 from each of them.

    with one_line_errors(model):            # bad input -> "error: ..." on stderr, exit 2
        at_least(1, {"--runs": runs})
        patterns = selection(patterns, "--patterns")
        preset = preset_option(preset)          # --preset default|fast
        check_model_name(model)
        ...load and run...

Checks raise ConfigError or ModelLoadError, as the library does; `one_line_errors` turns
those, and MLX refusing to run the model on this backend, into the message.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Iterator, Mapping, Optional

import typer

from zmlx.config import PRESETS, ConfigError, PatchConfig, Preset, check_preset
from zmlx.models import ModelLoadError

# What MLX's CPU backend cannot run, and what to do instead.
# The MODEL argument and --patterns option every model command takes, worded once.
ModelArg = Annotated[str, typer.Argument(help="checkpoint directory, Hub id, or synth:FAMILY/PRESET/QUANT")]
PatternsOpt = Annotated[
    Optional[str],
    typer.Option(help="comma-separated patterns (default: the family's preset; none: no patterns)"),
]

PRESET_HELP = (
    f"{' or '.join(PRESETS)}: default applies exact patterns only (identical tokens); fast also "
    "the close patterns the ledger shows ACCURATE on the family and backend "
    "(default: $ZMLX_PRESET, else default; explicit --patterns win)"
)

_MLX_HINTS = {
    "GatherMM": "MLX's CPU backend runs unquantized MoE experts only in float32: use a quantized "
    "checkpoint (e.g. synth:FAMILY/tiny/affine4)",
}


def at_least(minimum: int, options: Mapping[str, int]) -> None:
    """ConfigError naming each option below `minimum`: at_least(1, {"--runs": runs})."""
    low = [f"{name} {value}" for name, value in options.items() if value < minimum]
    if low:
        raise ConfigError(f"{', '.join(low)}: must be at least {minimum}")


def finite(
    option: str, value: float | None, *, at_least: float | None = None, above: float | None = None
) -> None:
    """ConfigError unless `value` is None or a finite number (not nan, not inf) within the
    bound: finite("--perturb", perturb, at_least=0)."""
    if value is None:
        return
    if (
        not math.isfinite(value)
        or (at_least is not None and value < at_least)
        or (above is not None and value <= above)
    ):
        bound = f" >= {at_least:g}" if at_least is not None else f" > {above:g}" if above is not None else ""
        raise ConfigError(f"{option} {value}: must be a finite number{bound}")


def selection(value, option: str) -> tuple[str, ...] | None:
    """--patterns / --exclude in the one selection grammar (zmlx.config.parse_selection),
    names checked against the registry: None, () for none, or the names."""
    from zmlx.patch.core import parse_names

    return parse_names(value, option)


def preset_option(value: str | None, option: str = "--preset") -> Preset | None:
    """--preset: default (exact patterns) or fast (also the close patterns the ledger shows
    ACCURATE; zmlx.config.PRESETS); None when not given (then ZMLX_PRESET, else default)."""
    return check_preset(value, option)


def environment() -> PatchConfig:
    """The environment's configuration, checked before any model is loaded: bad values and
    unknown pattern names are errors, unknown ZMLX_* names a warning."""
    from zmlx.patch.core import check_names, warn_unknown_variables

    config = PatchConfig.from_env()
    check_names(config.patterns or (), "ZMLX_PATTERNS")
    check_names(config.exclude, "ZMLX_EXCLUDE")
    warn_unknown_variables(config)
    return config


def check_model_name(model: str) -> None:
    """A synth: spec that does not parse is refused before anything else runs."""
    from zmlx import synth

    if synth.is_spec(model):
        try:
            synth.SynthSpec.parse(model)
        except synth.SynthError as e:
            raise ModelLoadError(str(e)) from None


def message_for(error: BaseException, model: str | None = None) -> str | None:
    """The one-line message for an error caused by the user's input or by what MLX can run
    here, or None for anything else (a bug, which keeps its traceback)."""
    from zmlx import backend, synth
    from zmlx.distributed import ShardError

    if isinstance(error, (ConfigError, ModelLoadError, synth.SynthError, ShardError)):
        return str(error)
    text = str(error).strip()
    # MLX's own errors name the operation that refused ("[GatherMM::eval] ..."): what MLX
    # cannot run on this backend is not zmlx's to trace back. Other RuntimeErrors are bugs.
    if isinstance(error, RuntimeError) and text.startswith("["):
        text = text.splitlines()[0]
        hint = next((f" ({h})" for key, h in _MLX_HINTS.items() if key in text), "")
        return f"MLX could not run {model or 'the model'} on {backend.current()}: {text}{hint}"
    return None


def _show_zmlx_warning(original):
    def show(message, category, filename, lineno, file=None, line=None):
        from zmlx.patch import ZmlxWarning

        if issubclass(category, ZmlxWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def model_loader():
    """(group, load): the launcher's mx.distributed group (None when this process was not
    started by `mlx.launch`) and the loader to use, zmlx.models.load's signature: under a
    launcher the model is split over the group (zmlx.distributed.load, tensor parallel)."""
    import functools

    from zmlx import distributed
    from zmlx.models import load

    group = distributed.world()
    return group, (load if group is None else functools.partial(_load_split, group=group))


def _load_split(name: str, group, progress=None):
    from zmlx import distributed

    return distributed.load(name, group)


@contextmanager
def one_line_errors(model: str | None = None) -> Iterator[None]:
    """Inside: bad input (see `message_for`) prints `error: <message>` on stderr and exits
    with status 2 (typer.Exit); a ZmlxWarning prints as one `warning: <message>` line."""
    import typer

    with warnings.catch_warnings():
        warnings.showwarning = _show_zmlx_warning(warnings.showwarning)
        try:
            yield
        except (typer.Exit, typer.Abort):  # click's, themselves RuntimeErrors: already answers
            raise
        except Exception as e:
            message = message_for(e, model)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(2) from None


class Parser(argparse.ArgumentParser):
    """argparse for the benchmark scripts, with the commands' answer to bad input: one
    `error: <message>` line on stderr and exit status 2 (argparse's own prints its usage too)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
