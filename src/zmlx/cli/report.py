"""`zmlx report` / `python -m zmlx.bench.report CAPSULE [CAPSULE ...]`: capsules as tables.

One capsule: a row per variant (decode and prefill tok/s median [min-max], peak
memory, kernels per token, fidelity, decode speedup vs the baseline). Two or more:
the same figures side by side, with the ratio of each to the first capsule's. A kernel
micro-benchmark capsule (benchmarks/bench_kernels.py): its kernel rows and, where measured,
the custom-call overhead rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from zmlx import ui
from zmlx.bench.capsule import CapsuleError, load


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def _median(v: dict[str, Any], key: str):
    s = (v.get("summary") or {}).get(key)
    return s["median"] if isinstance(s, dict) else s


def single_table(capsule: dict[str, Any], title: str):
    from rich.table import Table

    d = capsule["device"]
    t = Table(title=f"{title}: {capsule['model']['name']} on {d['name']}")
    for col in (
        "variant",
        "decode tok/s",
        "prefill tok/s",
        "peak GB",
        "kernels/tok",
        "GPU µs/tok",
        "fidelity",
        "speedup",
    ):
        t.add_column(col, justify="left" if col in ("variant", "fidelity") else "right")
    base = next((v for v in capsule["variants"] if v["name"] == capsule.get("baseline")), None)
    base_decode = _median(base, "decode_tps") if base else None
    for v in capsule["variants"]:
        if v.get("skipped"):
            t.add_row(v["name"], "-", "-", "-", "-", "-", f"SKIP ({v['skipped']})", "-")
            continue
        s = v["summary"]
        dec = s["decode_tps"]
        fid = v.get("fidelity") or {}
        fid_text = f"{fid.get('verdict')} {fid.get('identical')}/{fid.get('total')}"
        speed = dec["median"] / base_decode if base_decode else None
        t.add_row(
            v["name"],
            f"{dec['median']:.1f} [{dec['min']:.1f}-{dec['max']:.1f}]",
            _fmt(s["prompt_tps"]["median"]),
            _fmt(s["peak_memory_gb"], ".3f"),
            _fmt(v.get("kernels_per_token"), ".0f"),
            _fmt(v.get("gpu_us_per_token"), ".0f"),
            fid_text,
            _fmt(speed, ".3f") + "x" if speed else "-",
        )
    p = capsule["params"]
    t.caption = (
        f"{p.get('runs')} runs x {p.get('max_tokens')} tokens, prompt {p.get('prompt_tokens')} tokens; "
        f"mlx {capsule['versions']['mlx']}, mlx-lm {capsule['versions']['mlx_lm']}, "
        f"commit {(capsule['git'].get('commit') or 'unknown')[:10]}"
        f"{' (dirty)' if capsule['git'].get('dirty') else ''}"
    )
    return t


def compare_table(capsules: list[tuple[str, dict[str, Any]]]):
    from rich.table import Table

    t = Table(title="capsules compared (ratio = this / first)")
    t.add_column("variant")
    t.add_column("figure")
    for label, _ in capsules:
        t.add_column(label, justify="right")
    for label, _ in capsules[1:]:
        t.add_column(f"ratio {label}", justify="right")
    names: list[str] = []
    for _, c in capsules:
        names += [v["name"] for v in c["variants"] if v["name"] not in names]
    for name in names:
        for figure, key in (
            ("decode tok/s", "decode_tps"),
            ("prefill tok/s", "prompt_tps"),
            ("peak GB", "peak_memory_gb"),
            ("kernels/tok", "kernels_per_token"),
            ("GPU µs/tok", "gpu_us_per_token"),
        ):
            values: list[Any] = []
            for _, c in capsules:
                v = next((v for v in c["variants"] if v["name"] == name and not v.get("skipped")), None)
                if v is None:
                    values.append(None)
                elif key in ("kernels_per_token", "gpu_us_per_token"):
                    values.append(v.get(key))
                else:
                    values.append(_median(v, key))
            ratios = [(x / values[0]) if (x is not None and values[0]) else None for x in values[1:]]
            t.add_row(name, figure, *[_fmt(x, ".2f") for x in values], *[_fmt(r, ".3f") for r in ratios])
    return t


def kernels_table(rows: list[dict[str, Any]], title: str):
    """A kernel micro-benchmark's rows (zmlx.bench.kernels.run) as a table."""
    from rich.table import Table

    t = Table(title=title)
    for col in (
        "kernel",
        "shape",
        "launches",
        "GPU µs stock",
        "GPU µs fused",
        "GPU ratio",
        "in-graph µs stock",
        "in-graph µs fused",
        "in-graph ratio",
        "synced ratio",
        "bitwise",
    ):
        t.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    by = {(r["kernel"], r["shape"], r["side"]): r for r in rows}
    for (kernel, shape, side), s in by.items():
        if side != "stock":
            continue
        f = by[(kernel, shape, "fused")]

        def fmt(x, spec=".1f"):
            return "-" if x is None else format(x, spec)

        t.add_row(
            kernel,
            shape,
            f"{fmt(s['launches'], '.0f')} -> {fmt(f['launches'], '.0f')}",
            fmt(s["gpu_us"], ".2f"),
            fmt(f["gpu_us"], ".2f"),
            fmt(f["gpu_us"] / s["gpu_us"] if s["gpu_us"] else None, ".3f"),
            fmt(s.get("graph_us")),
            fmt(f.get("graph_us")),
            fmt(f["graph_us"] / s["graph_us"] if s.get("graph_us") else None, ".3f"),
            fmt(f["wall_us"] / s["wall_us"], ".3f"),
            "yes" if s["bitwise"] else "NO",
        )
    return t


def overhead_table(rows: list[dict[str, Any]], title: str):
    """The custom-call overhead diagnostic (zmlx.bench.overhead's rows) as a table."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("call", "in-graph µs", "build graph µs", "eval µs"):
        t.add_column(col, justify="left" if col == "call" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["case"], f"failed: {r['error']}", "", "")
        else:
            t.add_row(
                r["case"],
                f"{r['graph_us']:.1f}",
                f"{r.get('build_us', float('nan')):.1f}",
                f"{r.get('eval_us', float('nan')):.1f}",
            )
    return t


def command(capsules: Annotated[list[Path], typer.Argument(help="capsule JSON files")]):
    """Print a capsule as a table; with several, each figure side by side and its ratio."""
    try:
        loaded = [(p.stem, load(p)) for p in capsules]
    except CapsuleError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    console = ui.console()
    for label, c in loaded:
        if "kernels" in c:  # a kernel micro-benchmark capsule (benchmarks/bench_kernels.py)
            console.print(kernels_table(c["kernels"], f"{label} on {c['device']['name']}"))
            if c.get("custom_call_overhead"):
                console.print(overhead_table(c["custom_call_overhead"], "custom-call overhead (per call)"))
        else:
            console.print(single_table(c, label))
    if len(loaded) > 1 and not any("kernels" in c for _, c in loaded):
        console.print(compare_table(loaded))


def main() -> None:
    ui.run_command(command)
