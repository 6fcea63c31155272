"""All configuration zmlx takes from the environment, read here and nowhere else.

Variables:
  ZMLX_PATTERNS   comma-separated patterns to apply instead of the family's preset
  ZMLX_EXCLUDE    comma-separated patterns to leave out
  ZMLX_<PATTERN>  one flag per pattern (e.g. ZMLX_MOE_ROUTER): 1 adds it to the
                  preset, 0 removes it; explicit `patterns=` arguments win over flags
  ZMLX_MOE_SHARED_EXPERTS_OVERLAP
                  1: the MoE block runs its shared expert on a second stream,
                  alongside the routed experts (experiment, off by default; needs
                  ZMLX_MOE_STREAMS >= 2, which it implies when unset)
  ZMLX_MOE_STREAMS
                  streams the MoE block may use (default 1; 2 with the overlap)
  ZMLX_GIT_COMMIT, ZMLX_GIT_DIRTY
                  the commit a run stamps on its records when the tree has no .git
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_NOT_FLAGS = ("ZMLX_PATTERNS", "ZMLX_EXCLUDE", "ZMLX_GIT_COMMIT", "ZMLX_GIT_DIRTY",
              "ZMLX_MOE_STREAMS", "ZMLX_MOE_SHARED_EXPERTS_OVERLAP")


class ConfigError(ValueError):
    """A configuration value zmlx cannot use; the message says which and why."""


def split_names(value: str | None) -> tuple[str, ...] | None:
    """'a, b,,c' -> ('a', 'b', 'c'); None or blank -> None."""
    if value is None or not value.strip():
        return None
    return tuple(n.strip() for n in value.split(",") if n.strip())


def flag_name(pattern: str) -> str:
    """The environment flag of a pattern: moe_router -> ZMLX_MOE_ROUTER."""
    return "ZMLX_" + pattern.upper()


@dataclass(frozen=True)
class PatchConfig:
    patterns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)
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
        flags = {
            k: v
            for k, v in env.items()
            if k.startswith("ZMLX_") and k not in _NOT_FLAGS
        }
        return cls(
            patterns=split_names(env.get("ZMLX_PATTERNS")),
            exclude=split_names(env.get("ZMLX_EXCLUDE")) or (),
            flags=flags,
            shared_overlap=_shared_overlap(env),
        )


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
