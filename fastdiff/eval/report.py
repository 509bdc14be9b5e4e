"""Results of a sweep: the markdown table, the Pareto plot (FD vs seconds per image) and results.jsonl.

Every function reads the rows `fastdiff.eval.sweep.run_sweep` returns (one dict per method, the lines of
results.jsonl) and nothing else, so a results folder can be re-tabulated without re-running anything.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["write_table", "pareto_front", "write_pareto_plot", "write_results"]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def write_table(rows: list[dict], path: str | Path, title: str = "sweep") -> str:
    """A markdown table of the rows (FD and KID x 1e3 per extractor, NFE, UNet calls, s/image, images/s)."""
    if not rows:
        raise ValueError("no rows to tabulate.")
    extractors = [k[3:] for k in rows[0] if k.startswith("fd_")]
    first = rows[0]
    lines = [f"# {title}: quality vs speed", ""]
    lines.append(f"- model: `{first['model']}`; N = {first['n']} images per method, seeds {first['base_seed']}..")
    lines[-1] += f"{first['base_seed'] + first['n'] - 1} (image i: seed base + i, one generator per image)"
    for name in extractors:
        ref = first["reference"][name]
        lines.append(
            f"- `{name}` features: {first[f'extractor_{name}']}; scored on N = {first[f'n_{name}']} samples "
            f"against {ref['source']} (N = {ref['n']})"
        )
    lines.append(f"- hardware: {first['hardware']}; processes: {first['world_size']}; batch {first['batch_size']}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()))
    lines.append("- FD: Fréchet distance between Gaussians fitted to sample and reference features; lower is better. "
                 "It is biased upwards at small N, so compare rows at the same N only")
    lines.append("- KID shown x 1e3 (± subset std), only for features of about unit scale: `-` for `lenet` (unscaled "
                 "ReLU activations dominate KID's cubic kernel)")
    lines.append("- s/image = generation wall time / images (all processes together)")
    lines.append(f"- written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    lines.append("")
    header = ["method", "NFE", "UNet calls", "UNet rows/image"]
    for name in extractors:
        header += [f"FD {name}", f"KID {name} x1e3"]
    header += ["s/image", "images/s", "peak MB"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for r in rows:
        cells = [r["method"], _fmt(r["nfe"]), _fmt(r["unet_calls"], 4), _fmt(r.get("unet_rows_per_image"), 4)]
        for name in extractors:
            kid = r[f"kid_{name}"]
            kid_txt = "-" if kid is None else f"{kid * 1e3:.2f} ± {r[f'kid_{name}_std'] * 1e3:.2f}"
            cells += [f"{r[f'fd_{name}']:.3f}", kid_txt]
        cells += [_fmt(r["s_per_image"], 4), _fmt(r["images_per_s"], 3), _fmt(r["peak_mem_mb"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) not dominated by another (lower cost and lower error), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def write_pareto_plot(rows: list[dict], path: str | Path) -> Path:
    """FD vs seconds per image (log x), one panel per extractor, labelled points and the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extractors = [k[3:] for k in rows[0] if k.startswith("fd_")]
    fig, axes = plt.subplots(1, len(extractors), figsize=(6 * len(extractors), 4.5), squeeze=False)
    for ax, name in zip(axes[0], extractors):
        usable = [r for r in rows if r["s_per_image"]]
        pts = [(r["s_per_image"], r[f"fd_{name}"]) for r in usable]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
        for r, (x, y) in zip(usable, pts):
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:orange", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds per image ({rows[0]['world_size']} process(es))")
        ax.set_ylabel(f"FD ({name} features, N = {rows[0][f'n_{name}']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"quality vs speed: {rows[0]['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(rows: list[dict], out_dir: str | Path, title: str = "sweep") -> None:
    """results.jsonl (atomic rewrite), results.md and pareto.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, out_dir / "results.jsonl")
    write_table(rows, out_dir / "results.md", title)
    write_pareto_plot(rows, out_dir / "pareto.png")
