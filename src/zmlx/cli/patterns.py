"""`zmlx patterns`: the registry as a table (what each pattern fuses, its fidelity class,
its flag, the families whose default preset has it, and those whose `fast` preset adds it)."""

from __future__ import annotations

from zmlx import ui


def command():
    """List the patterns: what each fuses, fidelity class, flag, families and presets."""
    from rich.table import Table

    from zmlx.config import flag_name
    from zmlx.families import FAMILIES
    from zmlx.patch import PATTERNS

    t = Table(title="zmlx patterns")
    for col in ("pattern", "fuses", "fidelity", "flag", "default in", "fast adds"):
        t.add_column(col)
    for name, p in PATTERNS.items():
        default = (
            ", ".join(
                _preset_cell(f, fam, name)
                for f, fam in FAMILIES.items()
                if name in fam.preset or any(name in p for p in fam.presets_on.values())
            )
            or "-"
        )
        exact_on = [b for b in ("cuda", "metal", "cpu") if p.fidelity_on(b) == "exact"]
        fidelity = p.fidelity
        if fidelity != "exact" and exact_on:
            fidelity += f" (exact on {', '.join(exact_on)})"
        fast = ", ".join(_fast_cell(f, fam, name) for f, fam in FAMILIES.items() if _fast_cell(f, fam, name))
        t.add_row(name, p.summary, fidelity, flag_name(name), default, fast or "-")
    if not any(evidence for fam in FAMILIES.values() for evidence in fam.fast_on.values()):
        t.caption = "fast preset: no close pattern is ACCURATE in the ledger yet, so fast = default"
    else:
        t.caption = "fast adds: close patterns the ledger shows ACCURATE on that family and backend"
    ui.console().print(t)


def _fast_cell(family: str, fam, name: str) -> str:
    """'glm4_moe_lite (cuda)': where preset="fast" adds the pattern; '' where it does not."""
    on = [b for b, evidence in fam.fast_on.items() if name in evidence]
    return f"{family} ({', '.join(on)})" if on else ""


def _preset_cell(family: str, fam, name: str) -> str:
    """'glm4_moe_lite' when in the preset everywhere, else 'glm4_moe_lite (cuda)'."""
    from zmlx.backend import BACKENDS

    on = [b for b in BACKENDS if name in fam.preset_on(b)]
    return family if len(on) == len(BACKENDS) else f"{family} ({', '.join(on)})"
