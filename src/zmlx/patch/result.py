"""What `zmlx.patch` reports: per pattern, its fidelity class on this backend (exact or
close), how many modules it patched or skipped (and why), and where it runs; for the
whole patch, the preset that chose the patterns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from zmlx.backend import Backend
from zmlx.kernels.core import Fidelity
from zmlx.patch.patterns import PATTERNS


@dataclass
class PatternReport:
    name: str
    fidelity: Fidelity  # on this backend: a "close" pattern whose kernels are bitwise stock here says "exact"
    backend: Backend
    # kernel: its custom kernels run; reference: their plain-MLX references run (no body for
    # the backend, a failed self-check); mlx: a pattern without custom kernels
    path: Literal["kernel", "reference", "mlx"]
    patched: list[str] = field(default_factory=list)  # module paths
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    fallbacks: list[str] = field(default_factory=list)  # why the reference runs

    @property
    def runs_on(self) -> str:
        return f"{self.backend} ({self.path})"


@dataclass
class PatchResult:
    family: str | None
    backend: Backend
    patterns: dict[str, PatternReport] = field(default_factory=dict)
    not_selected: dict[str, str] = field(default_factory=dict)  # name -> why
    message: str = ""
    # the preset that chose the patterns ("default": exact only; "fast": plus the close
    # patterns the ledger shows ACCURATE here), None when explicit patterns chose them
    preset: str | None = "default"
    preset_note: str = ""  # what the preset added or why it added nothing

    @property
    def patched_modules(self) -> int:
        return sum(len(r.patched) for r in self.patterns.values())

    @property
    def close(self) -> list[str]:
        """The applied patterns that are not bitwise stock on this backend."""
        return [n for n, r in self.patterns.items() if r.patched and r.fidelity != "exact"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patched_modules"] = self.patched_modules
        d["close"] = self.close
        return d

    def _notes(self) -> list[str]:
        preset = f"preset {self.preset}" if self.preset else "explicit patterns (no preset)"
        notes = [f"{preset}: {self.preset_note}" if self.preset_note else preset]
        if self.close:
            notes.append(
                f"close (not bitwise stock on {self.backend}; judged by the accuracy rule): "
                + ", ".join(self.close)
            )
        else:
            notes.append(f"every applied pattern is exact (bitwise stock) on {self.backend}")
        if self.message:
            notes.append(self.message)
        return notes

    def table(self):
        """A rich Table: one row per pattern; the caption says the preset and which are close."""
        from rich.table import Table

        t = Table(title=f"zmlx.patch: {self.family or 'unknown family'} on {self.backend}")
        for col in ("pattern", "fidelity", "patched", "skipped", "runs on", "notes"):
            t.add_column(col, justify="right" if col in ("patched", "skipped") else "left")
        for r in self.patterns.values():
            notes = sorted({reason for _, reason in r.skipped} | set(r.fallbacks))
            t.add_row(
                r.name,
                r.fidelity,
                str(len(r.patched)),
                str(len(r.skipped)),
                r.runs_on,
                "; ".join(notes),
            )
        for name, why in self.not_selected.items():
            t.add_row(name, PATTERNS[name].fidelity, "-", "-", "-", f"not applied: {why}")
        t.caption = "\n".join(self._notes())
        return t

    def __str__(self) -> str:
        lines = [f"zmlx.patch: family={self.family} backend={self.backend} preset={self.preset or 'none'}"]
        for r in self.patterns.values():
            lines.append(
                f"  {r.name} ({r.fidelity}): patched {len(r.patched)}, skipped "
                f"{len(r.skipped)}, runs on {r.runs_on}"
            )
            for reason in sorted({reason for _, reason in r.skipped} | set(r.fallbacks)):
                lines.append(f"    - {reason}")
        for name, why in self.not_selected.items():
            lines.append(f"  {name}: not applied ({why})")
        lines.extend(f"  {note}" for note in self._notes())
        return "\n".join(lines)
