"""All configuration zmlx takes from the environment, read here and nowhere else.

Variables (one set to the empty string counts as unset, as `VAR= cmd` unsets it for one
command; a ZMLX_* name zmlx does not know gets a ZmlxWarning naming the valid ones):
  ZMLX_PATTERNS   patterns to apply instead of the family's preset, in the selection
                  grammar of `parse_selection` ("a,b"; "none": no patterns)
  ZMLX_EXCLUDE    patterns to leave out, same grammar
  ZMLX_<PATTERN>  one flag per pattern (e.g. ZMLX_MOE_ROUTER): 1 adds it to the
                  preset, 0 removes it; explicit `patterns=` arguments win over flags
  ZMLX_PRESET     the preset when `patch(preset=)` / --preset is not given: default
                  (exact patterns only: identical tokens) or fast (also the close
                  patterns the ledger shows ACCURATE on the family and backend);
                  explicit patterns (argument or ZMLX_PATTERNS) win over any preset
  ZMLX_MOE_SHARED_EXPERTS_OVERLAP
                  1: the MoE block runs its shared expert on a second stream,
                  alongside the routed experts (experiment, off by default; needs
                  ZMLX_MOE_STREAMS >= 2, which it implies when unset)
  ZMLX_MOE_STREAMS
                  streams the MoE block may use (default 1; 2 with the overlap)
  ZMLX_KERNEL_COMMENTS
                  1: hand MLX the kernels' device code with its comments and layout
                  (readable compiler errors; the A/B of what compaction saves the
                  host); default 0: compacted (zmlx.kernels.compact). Read when a
                  kernel is built: once per kernel and process
  ZMLX_GIT_COMMIT, ZMLX_GIT_DIRTY
                  the commit a run stamps on its records when the tree has no .git
  ZMLX_LEDGER     the ledger `python -m zmlx.matrix` reads and writes when --ledger is
                  not given (default: $XDG_CACHE_HOME/zmlx/matrix.jsonl, else
                  ~/.cache/zmlx/matrix.jsonl; see `default_ledger_path`)
  MLX_ENABLE_TF32 MLX's own (read by MLX once per process, default on): 0 makes CUDA run
                  float32 matmuls in float32, not TF32. zmlx only reads it: with TF32 on,
                  the accuracy rule's float32 reference runs on the CPU stream
                  (`tf32_enabled`, zmlx.accuracy.exact_float32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# Every ZMLX_* variable that is not a pattern's flag (the registry knows those).
NOT_FLAGS = (
    "ZMLX_PATTERNS",
    "ZMLX_EXCLUDE",
    "ZMLX_PRESET",
    "ZMLX_GIT_COMMIT",
    "ZMLX_GIT_DIRTY",
    "ZMLX_LEDGER",
    "ZMLX_MOE_STREAMS",
    "ZMLX_MOE_SHARED_EXPERTS_OVERLAP",
    "ZMLX_KERNEL_COMMENTS",
    "ZMLX_KERNEL_SOURCES",
)


class ConfigError(ValueError):
    """A configuration value zmlx cannot use; the message says which and why."""


# default: exact patterns only; fast: also the close ones the ledger shows ACCURATE
Preset = Literal["default", "fast"]
PRESETS: tuple[Preset, ...] = ("default", "fast")


def check_preset(value: str | None, what: str = "preset") -> Preset | None:
    """The preset name, None when not given; ConfigError naming the valid ones otherwise."""
    if value is None:
        return None
    for preset in PRESETS:
        if value == preset:
            return preset
    raise ConfigError(f"unknown preset {value!r} in {what}; valid: {', '.join(PRESETS)}")


def parse_selection(value: str | Iterable[str] | None, what: str = "patterns") -> tuple[str, ...] | None:
    """The one pattern-selection grammar: `patch(patterns=, exclude=)`, every command's
    --patterns / --exclude, ZMLX_PATTERNS and ZMLX_EXCLUDE all mean the same by the same text.

      None              not given: for patterns the family's preset, for exclude nothing
      "none"            no patterns (stock mlx-lm); for exclude: nothing left out
      "a,b" or "a"      those patterns (applied in the registry's order); spaces around
                        names and a stray comma ("a,,b", "a,") are ignored
      ["a", "b"]        the same as "a,b" (each string read as above); an empty list or
                        tuple is Python's "none"
      "", ",", "  "     ConfigError: an empty list is a mistake, not a choice (write none)

    `what` names the source in the error ("--patterns", "ZMLX_EXCLUDE"). An environment
    variable set to "" counts as unset before this grammar sees it. Names are checked
    against the registry by `zmlx.patch.core.check_names`, not here.
    """
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value)
    if not parts:
        return ()
    if not all(isinstance(v, str) for v in parts):
        raise ConfigError(f"{what}: pattern names must be strings, got {value!r}")
    items = [name for part in parts for name in part.split(",")]
    names = tuple(n.strip() for n in items if n.strip())
    if not names:
        raise ConfigError(f"empty pattern list in {what} ({value!r}): use none for no patterns")
    if any(n.lower() == "none" for n in names):
        if len(names) > 1:
            raise ConfigError(f"{what}: none means no patterns and cannot be combined with names")
        return ()
    return names


def flag_name(pattern: str) -> str:
    """The environment flag of a pattern: moe_router -> ZMLX_MOE_ROUTER."""
    return "ZMLX_" + pattern.upper()


@dataclass(frozen=True)
class PatchConfig:
    patterns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)
    preset: Preset | None = None  # ZMLX_PRESET: used when patch() is given no preset
    # options patterns take (Pattern.options names them): see the module docstring
    shared_overlap: bool = False

    def flag(self, pattern: str) -> bool | None:
        """True/False when the pattern's flag is set, None when it is not."""
        return _switch(self.flags, flag_name(pattern))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> "PatchConfig":
        """From `environ` (default: the process environment), with `overrides` on top."""
        env = dict(os.environ if environ is None else environ)
        env.update(overrides or {})
        # Which ZMLX_* names are pattern flags is known only to the registry, so the
        # raw values are kept and parsed when a pattern asks for its flag.
        flags = {k: v for k, v in env.items() if k.startswith("ZMLX_") and k not in NOT_FLAGS}
        kernel_comments(env)  # read where kernels are built; a bad value is refused here first
        return cls(
            patterns=parse_selection(_set(env, "ZMLX_PATTERNS"), "ZMLX_PATTERNS"),
            exclude=parse_selection(_set(env, "ZMLX_EXCLUDE"), "ZMLX_EXCLUDE") or (),
            preset=check_preset(_set(env, "ZMLX_PRESET"), "ZMLX_PRESET"),
            flags=flags,
            shared_overlap=_shared_overlap(env),
        )


def _set(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    raw = env.get(name)
    return raw if raw else None


def _switch(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: use 1 (on) or 0 (off)")


def _shared_overlap(env: Mapping[str, str]) -> bool:
    overlap = bool(_switch(env, "ZMLX_MOE_SHARED_EXPERTS_OVERLAP"))
    raw = env.get("ZMLX_MOE_STREAMS")
    if raw is None or not raw.strip():
        return overlap
    try:
        streams = int(raw)
    except ValueError:
        raise ConfigError(f"ZMLX_MOE_STREAMS={raw!r}: a whole number of streams (1 or 2)") from None
    if streams not in (1, 2):
        raise ConfigError(f"ZMLX_MOE_STREAMS={raw!r}: 1 or 2 (one shared expert to overlap)")
    if overlap and streams < 2:
        raise ConfigError("ZMLX_MOE_SHARED_EXPERTS_OVERLAP=1 needs ZMLX_MOE_STREAMS=2 (or unset)")
    return overlap


def tf32_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether MLX's CUDA backend runs float32 matmuls as TF32 (MLX_ENABLE_TF32, MLX's
    default 1; any integer other than 0 means on, as MLX reads it)."""
    env = os.environ if environ is None else environ
    raw = (env.get("MLX_ENABLE_TF32") or "").strip()
    try:
        return int(raw) != 0 if raw else True
    except ValueError:
        return True


def kernel_comments(environ: Mapping[str, str] | None = None) -> bool:
    """Whether kernels get their device code as written (ZMLX_KERNEL_COMMENTS=1) rather than
    compacted (the default). ConfigError for a value that is not 0/1."""
    env = os.environ if environ is None else environ
    return bool(_switch(env, "ZMLX_KERNEL_COMMENTS"))


def kernel_sources_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where a patched process records the sources of the CUDA kernels it builds
    (ZMLX_KERNEL_SOURCES, a folder; zmlx.kernels.ptx_cache), for MLX's PTX cache; None: not
    recorded."""
    env = os.environ if environ is None else environ
    return Path(env["ZMLX_KERNEL_SOURCES"]).expanduser() if _set(env, "ZMLX_KERNEL_SOURCES") else None


def cuda_home(environ: Mapping[str, str] | None = None) -> Path:
    """The CUDA toolkit MLX's JIT takes its runtime headers from when its wheel's NVIDIA
    package has none: $CUDA_HOME, else $CUDA_PATH, else /usr/local/cuda (jit_module.cpp)."""
    env = os.environ if environ is None else environ
    return Path(env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda")


def mlx_ptx_cache_dir(mlx_version: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where MLX's CUDA JIT keeps compiled kernels: $MLX_PTX_CACHE_DIR, else
    <temp dir>/mlx/<version>/ptx (jit_module.cpp's ptx_cache_dir)."""
    env = os.environ if environ is None else environ
    if _set(env, "MLX_PTX_CACHE_DIR"):
        return Path(env["MLX_PTX_CACHE_DIR"])
    return Path(env.get("TMPDIR") or "/tmp") / "mlx" / mlx_version / "ptx"


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (`mlx.launch`) started this process as one rank of a group: it
    sets MLX_RANK for every backend. Only then does zmlx join mx.distributed's group (a
    process started on its own never touches a distributed backend)."""
    env = os.environ if environ is None else environ
    return bool((env.get("MLX_RANK") or "").strip())


def git_override(environ: Mapping[str, str] | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) given by ZMLX_GIT_COMMIT / ZMLX_GIT_DIRTY, for a copy of the tree
    without .git (the GPU machine receives the working tree only)."""
    env = os.environ if environ is None else environ
    commit = env.get("ZMLX_GIT_COMMIT") or None
    dirty = env.get("ZMLX_GIT_DIRTY")
    return commit, (None if dirty is None else dirty.strip().lower() in _TRUE)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ZMLX_* variables set now, for records that must say how a run was configured."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in sorted(env.items()) if k.startswith("ZMLX_")}


def default_ledger_path(environ: Mapping[str, str] | None = None) -> Path:
    """The ledger a `matrix` command uses without --ledger: $ZMLX_LEDGER, else
    $XDG_CACHE_HOME/zmlx/matrix.jsonl, else ~/.cache/zmlx/matrix.jsonl: the user's own,
    never a file in the current directory (a checkout's tracked ledger is written only
    when named)."""
    env = os.environ if environ is None else environ
    if _set(env, "ZMLX_LEDGER"):
        return Path(env["ZMLX_LEDGER"]).expanduser()
    if _set(env, "XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "zmlx" / "matrix.jsonl"
    home = Path(env["HOME"]) if _set(env, "HOME") else Path.home()
    return home / ".cache" / "zmlx" / "matrix.jsonl"
