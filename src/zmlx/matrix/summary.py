"""What the ledger says each pattern set is worth.

One row per (model, device, prompt length, tokens, patterns): the latest current line
(superseded lines are left out). A line measured by several ranks (a model split by
mx.distributed) is on a device of its own, "<device> x N ranks": beside, never instead of,
the one-process line of the same set. Each ratio stands next to the noise floor of the same
model, device and prompt length: the largest |stock-vs-stock ratio - 1| among that
group's current `--patterns none` lines. A ratio inside its floor says nothing; a group
without such a line has no floor, and the report says so.
"""

from __future__ import annotations

from typing import Any, Iterable

from zmlx.matrix.ledger import line_id

Row = dict[str, Any]


def device_label(e: dict[str, Any]) -> str:
    """The line's device, with the ranks a distributed run split the model over."""
    ranks = e.get("world_size") or 1
    return e["device"]["name"] + (f" x {ranks} ranks" if ranks > 1 else "")


def noise_key(e: dict[str, Any]) -> tuple:
    return (e["model"], device_label(e), e.get("prompt_tokens"))


def is_noise_line(e: dict[str, Any]) -> bool:
    return not e["patterns"] and e.get("speedup") is not None and e.get("fidelity") != "SKIP(RAM)"


def noise_floors(entries: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (model, device, prompt length): the floor and the stock-vs-stock lines it comes from."""
    floors: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        if is_noise_line(e):
            f = floors.setdefault(noise_key(e), {"floor": 0.0, "lines": []})
            f["floor"] = max(f["floor"], abs(e["speedup"] - 1.0))
            f["lines"].append(line_id(e))
    return floors


def commit_label(e: dict[str, Any]) -> str:
    """'abc1234' (clean), 'abc1234+dirty', 'abc1234?' (state unknown), '?' (no commit).
    Schema 1 wrote an unknown state as clean, so its lines say '?' unless a checkout said so."""
    git = e.get("git") or {}
    commit, dirty = git.get("commit"), git.get("dirty")
    if not commit:
        return "?"
    if e.get("schema_version", 1) < 2 and dirty is False:
        dirty = None  # schema 1 wrote "unknown" as False
    return commit[:7] + ("+dirty" if dirty else "?" if dirty is None else "")


def summarize(entries: Iterable[dict[str, Any]]) -> list[Row]:
    """Latest line per (model, device, prompt, tokens, patterns), sorted by model, device,
    prompt length, tokens and patterns; each with its noise floor."""
    entries = list(entries)
    floors = noise_floors(entries)
    latest: dict[tuple, dict[str, Any]] = {}
    counts: dict[tuple, int] = {}
    for e in entries:
        key = (*noise_key(e), e.get("max_tokens"), tuple(e["patterns"]))
        counts[key] = counts.get(key, 0) + 1
        if key not in latest or e["timestamp"] >= latest[key]["timestamp"]:
            latest[key] = e
    rows = []
    for key in sorted(latest, key=lambda k: (k[0], k[1], k[2] or 0, k[3] or 0, k[4])):
        e = latest[key]
        floor = floors.get(noise_key(e))
        speedup = e.get("speedup")
        beyond = None
        if floor is not None and speedup is not None and e["patterns"]:
            beyond = abs(speedup - 1.0) > floor["floor"]
        rows.append(
            {
                "line": line_id(e),
                "model": e["model"],
                "model_label": e.get("model_label"),
                "quantization": e.get("quantization"),
                "device": device_label(e),
                "prompt_tokens": e.get("prompt_tokens"),
                "patterns": e["patterns"],
                "max_tokens": e.get("max_tokens"),
                "runs": e.get("runs"),
                "stock_decode_tps": e.get("stock_decode_tps_median"),
                "patched_decode_tps": e.get("decode_tps_median"),
                "speedup": speedup,
                "run_ratios": run_ratios(e),
                "noise_floor": None if floor is None else floor["floor"],
                "noise_lines": [] if floor is None else floor["lines"],
                "beyond_noise": beyond,
                "fidelity": e["fidelity"],
                "kernels_per_token": e.get("kernels_per_token"),
                "stock_kernels_per_token": e.get("stock_kernels_per_token"),
                "gpu_us_per_token": e.get("gpu_us_per_token"),
                "stock_gpu_us_per_token": e.get("stock_gpu_us_per_token"),
                "issue_ms_per_step": e.get("issue_ms_per_step"),
                "stock_issue_ms_per_step": e.get("stock_issue_ms_per_step"),
                "build_ms_per_step": e.get("build_ms_per_step"),
                "stock_build_ms_per_step": e.get("stock_build_ms_per_step"),
                "compiled_decode": e.get("compiled_decode"),
                "commit": commit_label(e),
                "measurements": counts[key],
                "timestamp": e["timestamp"],
            }
        )
    return rows


def run_ratios(e: dict[str, Any]) -> tuple[float, float] | None:
    """The lowest and highest ratio of one run's patched decode rate to the same run's stock
    rate (the harness alternates them, so run i's two ran side by side): how far a single
    pair strays from the medians' ratio. None for a line of fewer than two runs."""
    p, s = e.get("decode_tps"), e.get("stock_decode_tps")
    if not isinstance(p, list) or not isinstance(s, list) or len(p) != len(s) or len(p) < 2:
        return None
    ratios = [a / b for a, b in zip(p, s) if b]
    return (min(ratios), max(ratios)) if len(ratios) >= 2 else None


def speedup_cell(r: Row) -> str:
    """The medians' ratio, and in brackets the runs' lowest and highest (`run_ratios`)."""
    text = fmt(r["speedup"], ".3f")
    if r["speedup"] is not None and (rr := r.get("run_ratios")) is not None:
        text += f" ({rr[0]:.2f}-{rr[1]:.2f})"
    return text


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def host_ms(e: dict[str, Any]) -> str:
    """The host time to issue a decode step, stock -> patched, and compiled_decode's traces
    where it ran; '-' for lines from before schema 4 (not measured)."""
    p, s = e.get("issue_ms_per_step"), e.get("stock_issue_ms_per_step")
    if p is None or s is None:
        return "-"
    text = f"{s:.2f} -> {p:.2f}"
    if (cd := e.get("compiled_decode")) is not None:
        n = cd.get("traces")
        text += f" ({n} trace{'' if n == 1 else 's'})"
    return text


def cells(r: Row) -> dict[str, str]:
    """One row's cells as text, shared by the terminal table and the Markdown table."""
    k, sk = r["kernels_per_token"], r["stock_kernels_per_token"]
    g, sg = r["gpu_us_per_token"], r["stock_gpu_us_per_token"]
    floor = r["noise_floor"]
    if not r["patterns"]:
        noise = "a floor sample"
    elif floor is None:
        noise = "no floor"
    else:
        noise = f"±{floor * 100:.1f}%: " + ("beyond" if r["beyond_noise"] else "within")
    return {
        "line": r["line"],
        "patterns": ",".join(r["patterns"]) or "none (stock vs stock)",
        "prompt": fmt(r["prompt_tokens"], "d") if isinstance(r["prompt_tokens"], int) else "?",
        "tokens": f"{r['max_tokens']} x {r['runs']}",
        "stock tok/s": fmt(r["stock_decode_tps"]),
        "patched tok/s": fmt(r["patched_decode_tps"]),
        "speedup": speedup_cell(r),
        "noise floor": noise,
        "fidelity": r["fidelity"],
        "kernels/tok": f"{fmt(sk, '.0f')} -> {fmt(k, '.0f')}" if k is not None else "-",
        "GPU ms/tok": f"{sg / 1e3:.2f} -> {g / 1e3:.2f}" if g is not None and sg is not None else "-",
        "host ms/step": host_ms(r),
        "commit": r["commit"],
    }


COLUMNS = (
    "line",
    "patterns",
    "prompt",
    "tokens",
    "stock tok/s",
    "patched tok/s",
    "speedup",
    "noise floor",
    "fidelity",
    "kernels/tok",
    "GPU ms/tok",
    "host ms/step",
    "commit",
)


def columns(group: list[Row]) -> tuple[str, ...]:
    """The terminal table's columns: host ms/step only where a line measured it (schema 4 on),
    so that a table of older lines keeps its width."""
    if any(r["issue_ms_per_step"] is not None for r in group):
        return COLUMNS
    return tuple(c for c in COLUMNS if c != "host ms/step")


def groups(rows: list[Row]) -> dict[tuple, list[Row]]:
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault((r["model"], r["quantization"], r["device"]), []).append(r)
    return out


def title(model: str, quant: str | None, device: str, group: list[Row]) -> str:
    """A table's title: the model, its quantization and device, and the label of a
    layer-faithful synthetic model (its name alone would pass for the real one)."""
    labels = sorted({r["model_label"] for r in group if r.get("model_label")})
    return f"{model} ({quant}) on {device}" + "".join(f" [{label}]" for label in labels)


def markdown(rows: list[Row]) -> str:
    """The report as Markdown tables (one per model and device), for documents that quote
    the ledger: every number in it carries the id of the ledger line it comes from."""
    parts = []
    for (model, quant, device), group in groups(rows).items():
        parts.append(f"{title(model, quant, device, group)}:\n")
        parts.append("| " + " | ".join(COLUMNS) + " |")
        parts.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for r in group:
            c = cells(r)
            parts.append("| " + " | ".join(c[col].replace("|", "\\|") for col in COLUMNS) + " |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
