"""mlx-lm's own commands (generate, chat, server) with the model patched right after loading.

    run("generate", ["--model", path, "--prompt", "hi", "--patterns", "moe_router"])

mlx-lm offers no hook between loading a model and using it, so this is a small shim around
its loader: each command module imports `load` (and `sharded_load`) from `mlx_lm.utils` at
module level and calls it by that name inside `main()`. While the command runs, those names
in the command's module are replaced by wrappers that call mlx-lm's loader and then
`zmlx.patch` on the model it returns (the draft model of `--draft-model` too: it is loaded
the same way); afterwards the originals are put back. Nothing of mlx-lm is copied: its
argument parsing, generation loop, server and output are its own.

zmlx's flags (`--patterns`, `--exclude`, `--preset`, `--no-patch`) are taken out of the
arguments before mlx-lm parses them; every other argument reaches mlx-lm untouched. The
patch report goes to stderr, one line per pattern, so stdout is exactly what mlx-lm prints.
The shim relies on mlx-lm internals (the module-level loader names); `check_hooks` says
clearly when an mlx-lm version no longer has them.

mlx-lm's `--kv-bits` on an MLA model (its cache holds the latent) needs the mla_kv_quant
pattern on every attention: the preset's patterns run less those that cannot read a
quantized latent (KV_QUANT_CONFLICTS), plus mla_kv_quant; anything else (--no-patch, DSA
models, bits other than 4 and 8, groups other than 32 and 64) is one error line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TextIO

from zmlx.config import ConfigError, PatchConfig, Preset, check_preset

# command -> the mlx-lm module whose main() runs it
TOOLS = {"generate": "mlx_lm.generate", "chat": "mlx_lm.chat", "server": "mlx_lm.server"}

# The loader names each command's module imports from mlx_lm.utils and calls in main()
# (sharded_load: chat and server in distributed mode). Each must be there; the shim wraps
# every one a module has.
REQUIRED_LOADERS = {
    "generate": ("load",),
    "chat": ("load", "sharded_load"),
    "server": ("load", "sharded_load"),
}

# mlx-lm versions the shim was tested against (pyproject's pin); another version gets a
# warning on stderr, not a refusal: the loader names rarely change, and check_hooks catches it
# when they do.
TESTED_MLX_LM = ("0.32.2",)

OWN_FLAGS_HELP = (
    "zmlx options (taken out before mlx-lm parses the rest):\n"
    "  --patterns P      comma-separated patterns to apply (none: no patterns; default: the "
    "family's preset)\n"
    "  --exclude P       comma-separated patterns not to apply\n"
    "  --preset NAME     default (exact patterns only: identical tokens) or fast (also the close "
    "patterns the ledger shows ACCURATE)\n"
    "  --no-patch        run mlx-lm's command unpatched\n"
    "The patch report goes to stderr; stdout is mlx-lm's."
)

_VALUED = ("--patterns", "--exclude", "--preset")


@dataclass(frozen=True)
class ToolOptions:
    """zmlx's part of a tool command line: what `zmlx.patch` is called with."""

    patterns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    preset: Preset | None = None
    patch: bool = True
    kv_bits: bool = False  # mlx-lm's --kv-bits was given (it stays in mlx-lm's arguments)
    # the values of mlx-lm's --kv-bits and --kv-group-size where given as integers (else None)
    kv_quant: tuple[int | None, int | None] = (None, None)


class MlxLmHookError(ConfigError):
    """The installed mlx-lm lacks the loader names the shim wraps."""


def split_args(argv: Sequence[str]) -> tuple[ToolOptions, list[str]]:
    """zmlx's options out of `argv` (`--flag value` or `--flag=value`), checked (unknown
    pattern or preset names raise ConfigError), and the rest for mlx-lm, in order."""
    from zmlx.patch.core import parse_names

    values: dict[str, str] = {}
    no_patch = False
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "--no-patch":
            no_patch = True
        elif name in _VALUED:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{name} needs a value")
                i += 1
                value = args[i]
            values[name] = value
        else:
            rest.append(arg)
        i += 1
    options = ToolOptions(
        patterns=parse_names(values.get("--patterns"), "--patterns"),
        exclude=parse_names(values.get("--exclude"), "--exclude"),
        preset=check_preset(values.get("--preset"), "--preset"),
        patch=not no_patch,
        kv_bits=any(a.partition("=")[0] == "--kv-bits" for a in rest),
        kv_quant=(_int_value(rest, "--kv-bits"), _int_value(rest, "--kv-group-size")),
    )
    if not options.patch and len(values):
        raise ConfigError(f"--no-patch cannot be combined with {', '.join(sorted(values))}")
    return options, rest


def _int_value(args: Sequence[str], flag: str) -> int | None:
    """The last value of mlx-lm's `flag` in `args` as an int; None when it is absent or not an
    int (mlx-lm's own parser then says so)."""
    value = None
    for i, arg in enumerate(args):
        name, eq, text = arg.partition("=")
        if name == flag:
            text = text if eq else (args[i + 1] if i + 1 < len(args) else "")
            value = int(text) if text.lstrip("-").isdigit() else None
    return value


def tool_module(tool: str):
    """The mlx-lm module that runs `tool`; ConfigError for a command zmlx does not wrap."""
    if tool not in TOOLS:
        raise ConfigError(f"unknown mlx-lm tool {tool!r}; zmlx wraps: {', '.join(TOOLS)}")
    return importlib.import_module(TOOLS[tool])


def check_hooks(tool: str, module: Any = None) -> None:
    """MlxLmHookError unless `tool`'s module has `main` and the loader names it calls."""
    import mlx_lm

    module = module if module is not None else tool_module(tool)
    missing = [n for n in ("main", *REQUIRED_LOADERS[tool]) if not callable(getattr(module, n, None))]
    if missing:
        raise MlxLmHookError(
            f"{module.__name__} of mlx-lm {mlx_lm.__version__} has no {', '.join(missing)}: `zmlx {tool}` "
            f"cannot patch its model (tested with mlx-lm {', '.join(TESTED_MLX_LM)}); "
            "use zmlx.patch(model) in Python instead"
        )


def version_warning() -> str | None:
    """A warning line when the installed mlx-lm is not one the shim was tested with."""
    import mlx_lm

    if mlx_lm.__version__ in TESTED_MLX_LM:
        return None
    return (
        f"warning: zmlx's mlx-lm commands were tested with mlx-lm {', '.join(TESTED_MLX_LM)}; "
        f"this is {mlx_lm.__version__}"
    )


def report_lines(result, label: str) -> list[str]:
    """The patch report in compact form: a header, one line per applied pattern, one line
    per reason the others were not applied."""
    head = (
        f"zmlx: patched {label} (family {result.family}, backend {result.backend}, "
        f"preset {result.preset or 'none: explicit patterns'}): {result.patched_modules} modules"
    )
    lines = [head + (f"; {result.message}" if result.message else "")]
    for r in result.patterns.values():
        why = sorted({reason for _, reason in r.skipped} | set(r.fallbacks))
        lines.append(
            f"zmlx:   {r.name} ({r.fidelity}) patched {len(r.patched)}, skipped {len(r.skipped)}, "
            f"runs on {r.runs_on}" + (f" ({'; '.join(why)})" if why else "")
        )
    by_reason: dict[str, list[str]] = {}
    for name, why in result.not_selected.items():
        by_reason.setdefault(why, []).append(name)
    lines.extend(f"zmlx:   not applied ({why}): {', '.join(names)}" for why, names in by_reason.items())
    return lines


KV_BITS_MLA = (
    "--kv-bits: this model's attention caches MLA's latent (kv_lora_rank), which mlx-lm's "
    "attention cannot read from its quantized KV cache (it fails on the quantized tuples); {fix}"
)

# With --kv-bits on an MLA model the mla_kv_quant pattern must patch every attention: these
# patterns replace the attention's method first (registered earlier) and read a bf16 cache
# only, or give the model a cache that mlx-lm never quantizes (compiled_decode's static one).
KV_QUANT_CONFLICTS = ("mla_attention", "glm47_rope", "compiled_decode")


def kv_quant_selection(options: ToolOptions, config: PatchConfig) -> tuple[ToolOptions, PatchConfig]:
    """The selection with --kv-bits on an MLA model: the preset's patterns less
    KV_QUANT_CONFLICTS, plus mla_kv_quant; explicit --patterns must name mla_kv_quant and no
    conflict. ConfigError where they do not, or for bits or group sizes it does not read."""
    from zmlx.config import flag_name
    from zmlx.latent_quant import kv_quant_error

    if (why := kv_quant_error(*options.kv_quant)) is not None:
        raise ConfigError(why)
    fix = "run without --kv-bits"
    if not options.patch:
        raise ConfigError(KV_BITS_MLA.format(fix=f"zmlx's mla_kv_quant can: drop --no-patch, or {fix}"))
    if "mla_kv_quant" in (*(options.exclude or ()), *config.exclude):
        raise ConfigError(KV_BITS_MLA.format(fix=f"zmlx's mla_kv_quant can: do not exclude it, or {fix}"))
    explicit = options.patterns if options.patterns is not None else config.patterns
    if explicit is None:
        exclude = (*(options.exclude or ()), *KV_QUANT_CONFLICTS)
        flags = {**config.flags, flag_name("mla_kv_quant"): "1"}
        return dataclasses.replace(options, exclude=exclude), dataclasses.replace(config, flags=flags)
    bad = [n for n in explicit if n in KV_QUANT_CONFLICTS]
    if bad or "mla_kv_quant" not in explicit:
        what = f"leave {', '.join(bad)} out of" if bad else "add mla_kv_quant to"
        raise ConfigError(f"--kv-bits on an MLA model: {what} --patterns (the quantized latent cache)")
    return options, config


def check_kv_quant(result) -> None:
    """ConfigError unless mla_kv_quant patched every attention module it was meant to."""
    report = result.patterns.get("mla_kv_quant")
    if report is not None and report.patched and not report.skipped:
        return
    why = sorted({reason for _, reason in report.skipped}) if report is not None else []
    fix = f"mla_kv_quant does not apply ({'; '.join(why)})" if why else "zmlx has no pattern for it"
    raise ConfigError(KV_BITS_MLA.format(fix=f"{fix}: run without --kv-bits"))


def latent_cache(model) -> bool:
    """Whether the model's attention caches an MLA latent (an attention with kv_lora_rank)."""
    layers = getattr(model, "layers", None) or []
    return any(hasattr(getattr(layer, "self_attn", None), "kv_lora_rank") for layer in layers)


def patching_loader(
    loader: Callable, options: ToolOptions, config: PatchConfig | None, err: TextIO
) -> Callable:
    """`loader` (mlx-lm's load or sharded_load), then `zmlx.patch` on the model it returns;
    the result is returned unchanged (mlx-lm's tuple), the report written to `err`."""
    import zmlx
    from zmlx import distributed

    @functools.wraps(loader)
    def load(path_or_hf_repo, *args, **kwargs):
        loaded = loader(path_or_hf_repo, *args, **kwargs)
        quantized_latent = options.kv_bits and latent_cache(loaded[0])
        chosen, conf = options, config
        if quantized_latent:
            chosen, conf = kv_quant_selection(options, config or PatchConfig.from_env())
        if not options.patch:
            return loaded
        result = zmlx.patch(loaded[0], chosen.patterns, chosen.exclude, preset=chosen.preset, config=conf)
        if quantized_latent:
            check_kv_quant(result)
        if distributed.primary(distributed.world()):  # under mlx.launch: rank 0 reports
            print("\n".join(report_lines(result, str(path_or_hf_repo))), file=err, flush=True)
        return loaded

    return load


@contextmanager
def patched_loaders(
    module, options: ToolOptions, config: PatchConfig | None = None, err: TextIO | None = None
) -> Iterator[None]:
    """Inside, the loader names of `module` patch every model they load; restored after.
    sharded_load goes through zmlx.distributed.gpu_safe first: mlx-lm 0.32.2's cannot finish
    under NCCL (it ends with an all-sum on the CPU stream)."""
    from zmlx import distributed

    names = [n for n in ("load", "sharded_load") if callable(getattr(module, n, None))]
    originals = {n: getattr(module, n) for n in names}
    try:
        if options.patch or options.kv_bits:  # --no-patch --kv-bits: the check of MLA models
            for name, loader in originals.items():
                inner = distributed.gpu_safe(loader) if name == "sharded_load" else loader
                setattr(module, name, patching_loader(inner, options, config, err or sys.stderr))
        yield
    finally:
        for name, loader in originals.items():
            setattr(module, name, loader)


def run(tool: str, argv: Sequence[str], config: PatchConfig | None = None, prog: str | None = None) -> None:
    """Run mlx-lm's `tool` command with `argv` (its flags plus zmlx's), the model patched.

    zmlx's options are checked before anything is loaded (ConfigError). mlx-lm's argparse
    sees sys.argv = [prog, *its arguments]; sys.argv is restored afterwards. With -h/--help,
    mlx-lm's help is followed by zmlx's options."""
    module = tool_module(tool)
    check_hooks(tool, module)
    options, rest = split_args(argv)
    warning = version_warning()
    if warning:
        print(warning, file=sys.stderr)
    saved = sys.argv
    sys.argv = [prog or f"zmlx {tool}", *rest]
    try:
        with patched_loaders(module, options, config):
            module.main()
    except SystemExit as e:
        if e.code in (0, None) and any(a in ("-h", "--help") for a in rest):
            print(f"\n{OWN_FLAGS_HELP}")
        raise
    finally:
        sys.argv = saved
