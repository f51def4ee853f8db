"""Writing a sweep's results: ``sweep.csv`` (one row per case x method x start_t; baselines have empty ``start_t``, a
skipped metric reads ``skipped``, its reason is in ``sweep.json``), ``summary.csv`` and its text table
(:mod:`ldm.eval.summary`), ``curves.png``, ``realism.png`` and ``examples.png`` (upscaled nearest-neighbour).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.eval.metrics import Skipped
from ldm.eval.summary import INTERVAL_METRICS, SET_KEYS, interval_columns, summarize, summary_notes
from ldm.eval.sweep import REGION_MODES, ROW_METRICS, SweepExample, SweepResult
from ldm.imageio import to_uint8
from ldm.util import atomic_write_bytes

CSV_COLUMNS: tuple[str, ...] = ("image", "degradation", "method", "kind", "start_t", "effective_start", "seed", "seconds")
SUMMARY_COLUMNS: tuple[str, ...] = (
    "degradation",
    "method",
    "kind",
    "start_t",
    "effective_start",
    "n",
    "cases",
    "seeds",
    "seconds",
)
# what the printed table shows (the CSVs have everything)
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("psnr_clean", "PSNR->clean"),
    ("ssim_clean", "SSIM->clean"),
    ("lpips_clean", "LPIPS->clean"),
    ("psnr_input", "PSNR->input"),
    ("ssim_input", "SSIM->input"),
    ("psnr_clean_in", "PSNR->clean in"),
    ("psnr_input_out", "PSNR->input out"),
    ("seam", "seam"),
    ("swd", "SWDx1e3"),
    ("fid", "FID"),
    ("seconds", "s/img"),
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Skipped):
        return "skipped"
    if isinstance(value, float):
        return f"{value:.6g}"  # inf, -inf and nan as such
    return str(value)


def _write_csv(
    path: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    leading: Sequence[str],
    trailing: Sequence[str],
    present_only: bool = True,
) -> Path:
    """``leading`` columns, then those of ``trailing`` that some row holds (all of them: ``present_only`` False)."""
    columns = list(leading) + [c for c in trailing if not present_only or any(c in r for r in rows)]
    lines = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    atomic_write_bytes(path, buf.getvalue().encode())
    return Path(path)


def write_rows_csv(result: SweepResult, path: str | os.PathLike) -> Path:
    """The per-case CSV (see the module docstring)."""
    return _write_csv(path, result.rows, CSV_COLUMNS, ROW_METRICS)


def write_summary_csv(summary: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The summary CSV: the entries of :func:`~ldm.eval.summary.summarize`, one row each.  A metric's interval columns
    ``m_lo`` / ``m_hi`` / ``m_n`` come with it even where they are blank (no interval: fewer than two images, an
    infinite value, an absolute SWD; :func:`~ldm.eval.summary.summary_notes` says why, in ``sweep.json``)."""
    present = {k for r in summary for k in r}
    columns = interval_columns(tuple(m for m in INTERVAL_METRICS if m in present))
    return _write_csv(path, summary, SUMMARY_COLUMNS, [*columns, *(k for k in SET_KEYS if k in present)], False)


def _table_value(entry: dict[str, Any], key: str) -> str:
    """A table cell: the value (3 decimals), with ``(n=k)`` where it averages fewer images than the row's n."""
    value = entry.get(key)
    text = f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else _cell(value)
    n = entry.get(f"{key}_n")
    return f"{text} (n={n})" if isinstance(n, int) and n != entry.get("n") else text


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of the summary (means; the intervals are in ``summary.csv``): one block per
    degradation, then the notes on n and intervals (:func:`~ldm.eval.summary.summary_notes`)."""
    metrics = [(k, title) for k, title in TABLE_METRICS if any(k in s for s in summary)]
    if not any(isinstance(s.get("fid"), float) for s in summary):
        metrics = [(k, t) for k, t in metrics if k != "fid"]
    header = ["method", "start_t", "eff", "n"] + [title for _, title in metrics]
    blocks = []
    for degradation in dict.fromkeys(s["degradation"] for s in summary):
        rows = [header]
        for s in summary:
            if s["degradation"] != degradation:
                continue
            cells = [s["method"], _cell(s["start_t"]) or "-", _cell(s["effective_start"]) or "-", str(s["n"])]
            rows.append(cells + [_table_value(s, key) for key, _ in metrics])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"degradation: {degradation}"]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        blocks.append("\n".join(lines))
    notes = summary_notes(summary)
    return "\n\n".join(blocks + (["\n".join(f"note: {note}" for note in notes)] if notes else []))


def _mean_sem(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    sem = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), sem


def _draw_panel(ax: Any, result: SweepResult, metric: str, degradation: str, colors: dict[str, str]) -> dict[str, Any]:
    """Refiner curves (mean and a +-s.e.m. band) and baseline levels of one metric; returns legend handles.  A
    baseline far above the curves (PSNR to input ~70 dB) is written at the top edge instead of squashing them."""
    per_image: dict[str, dict[int | None, dict[str, list[float]]]] = {}  # method -> start_t -> image -> its values
    for row in result.rows:
        v = row.get(metric)
        if row["degradation"] == degradation and isinstance(v, float) and math.isfinite(v):
            per_image.setdefault(row["method"], {}).setdefault(row["start_t"], {}).setdefault(row["image"], []).append(v)
    # method -> start_t -> one value per image (its seeds' mean): the s.e.m. is over images, not images x seeds
    by_method = {m: {t: [float(np.mean(v)) for v in ims.values()] for t, ims in ts.items()} for m, ts in per_image.items()}
    handles: dict[str, Any] = {}
    curve_values: list[float] = []
    levels: list[tuple[str, float]] = []
    for method, (kind, _) in result.methods.items():
        values = by_method.get(method, {})
        if kind == "baseline":
            if values.get(None):
                levels.append((method, _mean_sem(values[None])[0]))
            continue
        ts = sorted(t for t in values if t is not None)
        if not ts:
            continue
        means, sems = np.array([_mean_sem(values[t]) for t in ts]).T
        ax.fill_between(ts, means - sems, means + sems, color=colors[method], alpha=0.15, linewidth=0)
        (handles[method],) = ax.plot(ts, means, color=colors[method], marker="o", label=method)
        curve_values += list(means - sems) + list(means + sems)
    span = (max(curve_values) - min(curve_values)) if curve_values else 0.0
    top = max(curve_values) + max(2.0, span) if curve_values and metric.startswith("psnr") else math.inf
    off_scale = []
    for method, level in levels:
        if level > top:
            off_scale.append(f"{method} {level:.1f}")
            continue
        handles[method] = ax.axhline(level, color=colors[method], linestyle="--", linewidth=1.2, label=method)
    if off_scale:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, top))
        ax.text(0.02, 0.97, "off scale: " + ", ".join(off_scale), transform=ax.transAxes, fontsize=7, va="top")
    return handles


def _plot(
    result: SweepResult,
    rows_spec: list[tuple[str, str]],
    row_height: float,
    draw: Callable[..., dict[str, Any]],
    title: str | None,
    caption: str,
    path: str | os.PathLike,
) -> Path:
    """One panel per degradation (columns) and ``(metric, label)`` of ``rows_spec`` (rows), each drawn by ``draw(ax,
    row, column, metric, label, degradation, colors) -> {method: legend handle}``, with legend, title and caption."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(result.degradations)
    fig, axes = plt.subplots(len(rows_spec), n, figsize=(4.2 * n, row_height * len(rows_spec) + 1.0), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: cycle[i % len(cycle)] for i, m in enumerate(result.methods)}
    handles: dict[str, Any] = {}
    for c, degradation in enumerate(result.degradations):
        for r, (metric, label) in enumerate(rows_spec):
            handles.update(draw(axes[r][c], r, c, metric, label, degradation, colors))
            if r == 0:
                axes[r][c].set_title("\n".join(textwrap.wrap(degradation.replace(",", ", "), 44)), fontsize=8)
            axes[r][c].grid(alpha=0.3)
    ordered = {m: handles[m] for m in result.methods if m in handles}
    if ordered:
        fig.legend(list(ordered.values()), list(ordered), loc="lower center", ncol=min(len(ordered), 6), fontsize=8)
    fig.suptitle((title + "\n" if title else "") + caption, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    path = Path(path)
    try:
        atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def plot_curves(result: SweepResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """PSNR to clean and to input against start_t (mean +- s.e.m. over images), one panel per degradation, one line per
    refiner, baselines dashed; no-reference: faithfulness only."""
    rows_spec = ([("psnr_clean", "PSNR to clean [dB] (higher: closer to clean)")] if result.reference else []) + [
        ("psnr_input", "PSNR to input [dB] (higher: more faithful)")
    ]
    if result.reference and any(isinstance(r.get("lpips_clean"), float) for r in result.rows):
        rows_spec.append(("lpips_clean", "LPIPS to clean (lower: closer)"))
    all_ts = sorted({t for ts in result.start_ts.values() for t in ts})

    def draw(ax: Any, r: int, c: int, metric: str, label: str, degradation: str, colors: dict[str, str]) -> dict[str, Any]:
        handles = _draw_panel(ax, result, metric, degradation, colors)
        if c == 0:
            ax.set_ylabel(label, fontsize=8)
        if r == len(rows_spec) - 1:
            ax.set_xlabel("start_t")
        if all_ts:
            ax.set_xticks(all_ts)
        return handles

    caption = "refiners: mean +- s.e.m. over images (each the mean of its seeds); dashed: baselines (no start_t)"
    return _plot(result, rows_spec, 3.2, draw, title, caption, path)


def plot_realism(
    result: SweepResult, summary: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None
) -> Path | None:
    """SWD x 10^3 to the realism reference against PSNR to the input (whole image; for masked cases also inside and
    outside the mask: one row each), one panel per degradation; refiners are lines over start_t, baselines points,
    PSNR inf at the right edge.  None (nothing written) without SWD.  ``summary``: ``summarize(result)``."""
    if not any(isinstance(s.get("swd"), float) for s in summary):
        return None
    masked = (("psnr_input_in", "PSNR to input inside mask [dB]"), ("psnr_input_out", "outside mask [dB]"))
    rows_spec = [("psnr_input", "PSNR to input [dB]")] + [(m, t) for m, t in masked if any(m in s for s in summary)]

    def draw(ax: Any, r: int, c: int, metric: str, label: str, degradation: str, colors: dict[str, str]) -> dict[str, Any]:
        points: dict[str, list[tuple]] = {}  # method -> [(start_t, x, swd), ...]
        for s in summary:
            x, y = s.get(metric), s.get("swd")
            if s["degradation"] == degradation and isinstance(x, float) and isinstance(y, float):
                points.setdefault(s["method"], []).append((s["start_t"], x, y))
        finite = [x for pts in points.values() for _, x, _ in pts if math.isfinite(x)]
        edge = (max(finite) + 3.0) if finite else 60.0
        handles = {}
        for method, pts in points.items():
            pts = sorted(pts, key=lambda p: -1 if p[0] is None else p[0])
            xs = [x if math.isfinite(x) else edge for _, x, _ in pts]
            ys = [y for _, _, y in pts]
            if result.methods[method][0] == "refiner":
                (handles[method],) = ax.plot(xs, ys, color=colors[method], marker="o", label=method)
                for (t, _, _), x, y in zip(pts, xs, ys):
                    ax.annotate(str(t), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            else:
                handles[method] = ax.scatter(xs, ys, color=colors[method], marker="s", label=method, zorder=3)
        ax.set_xlabel(label + (" (inf drawn at the edge)" if finite else ""), fontsize=7)
        if c == 0:
            ax.set_ylabel("SWD x 1e3 to clean photos (lower: more realistic)", fontsize=7)
        return handles

    caption = "realism vs faithfulness; refiner points labelled with start_t"
    return _plot(result, rows_spec, 3.4, draw, title, caption, path)


def image_grid(
    rows: Sequence[Sequence[torch.Tensor | None]], column_titles: Sequence[str], row_titles: Sequence[str] | None = None
) -> Image.Image:
    """A labelled grid of ``rows[i][j]`` ``[3, H, W]`` in [-1, 1] (None: an empty cell; at least one is not), tiles
    upscaled (nearest neighbour) to at least 128 px on the shorter side, ``row_titles[i]`` above each row."""
    min_tile, pad = 128, 6
    font = ImageFont.load_default()
    sizes = [t.shape[-2:] for row in rows for t in row if t is not None]
    h = max(int(s[0]) for s in sizes)
    w = max(int(s[1]) for s in sizes)
    scale = max(1, math.ceil(min_tile / max(1, min(h, w))))
    th, tw, text_h = h * scale, w * scale, 14
    n_cols = len(column_titles)
    row_h = th + pad + (text_h if row_titles else 0)
    canvas = Image.new("RGB", (pad + n_cols * (tw + pad), text_h + pad + len(rows) * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles):
        draw.text((pad + j * (tw + pad), pad // 2), _fit(draw, title, font, tw), fill="black", font=font)
    for i, row in enumerate(rows):
        y = text_h + pad + i * row_h
        if row_titles:
            draw.text((pad, y), _fit(draw, row_titles[i], font, canvas.width - 2 * pad), fill="dimgray", font=font)
            y += text_h
        for j, tile in enumerate(row[:n_cols]):
            if tile is None:
                continue
            img = Image.fromarray(to_uint8(tile).cpu().permute(1, 2, 0).numpy())
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
            canvas.paste(img, (pad + j * (tw + pad), y))
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def example_grid(examples: Sequence[SweepExample]) -> Image.Image:
    """clean | input | every output (in the order they were kept) for every example."""
    if not examples:
        raise ValueError("no examples to show")
    labels = list(dict.fromkeys(k for e in examples for k in e.outputs))
    reference = any(e.clean is not None for e in examples)
    titles = (["clean"] if reference else []) + ["input"] + labels
    rows = [([e.clean] if reference else []) + [e.input] + [e.outputs.get(label) for label in labels] for e in examples]
    row_titles = [f"{e.image} | {e.degradation} | seed {e.seed}" for e in examples]
    return image_grid(rows, titles, row_titles)


def before_after_grid(result: SweepResult, method: str, start_t: int | Mapping[str, int]) -> Image.Image:
    """clean | artifact | (mask) | refined (``method`` at ``start_t``: whole image, region, crop, as far as the sweep
    ran them) for every example, rows titled with the PSNR to clean of the artifact and of each refinement.
    ``start_t``: one for every example, or one per degradation label (degradations it does not name are left out).
    ValueError when ``method`` is not a refiner of the sweep or no example holds its output at its ``start_t``."""
    refiners = [name for name, (kind, _) in result.methods.items() if kind == "refiner"]
    # the columns: the whole-image refinement (where the sweep ran one) and each region mode
    shown_methods = [("whole", method)] if method in refiners else []
    shown_methods += [(mode, method + suffix) for mode, suffix in REGION_MODES.items() if method + suffix in refiners]
    if not shown_methods:
        raise ValueError(f"method {method!r} is not one of the sweep's refiners {refiners}")
    starts = dict(start_t) if isinstance(start_t, Mapping) else {e.degradation: start_t for e in result.examples}

    def has(e: SweepExample, m: str) -> bool:
        return e.degradation in starts and f"{m} t={starts[e.degradation]}" in e.outputs

    examples = [e for e in result.examples if any(has(e, m) for _, m in shown_methods)]
    if not examples:
        raise ValueError(f"no example holds {method!r} at start_t {start_t}; pass it in run_sweep's example_start_ts")
    shown_methods = [(mode, m) for mode, m in shown_methods if any(has(e, m) for e in examples)]
    psnr = {(r["image"], r["degradation"], r["seed"], r["method"], r["start_t"]): r.get("psnr_clean") for r in result.rows}
    with_mask = any(e.mask is not None for e in examples)
    one_start = len({starts[e.degradation] for e in examples}) == 1
    rows, titles = [], []
    for e in examples:
        t = starts[e.degradation]
        present = [m for _, m in shown_methods if has(e, m)]
        values = [psnr.get((e.image, e.degradation, e.seed, m, s)) for m, s in [("identity", None)] + [(m, t) for m in present]]
        numbers = " -> ".join(f"{v:.1f}" for v in values) + " dB | " if all(isinstance(v, float) for v in values) else ""
        where = f"{e.image} | {e.degradation.split(':')[0]}" + ("" if one_start else f" | t={t}")  # specs: in the CSVs
        titles.append(f"PSNR {numbers}{where}" if numbers else where)
        row = [e.clean, e.input]
        if with_mask:
            row.append(None if e.mask is None else (e.mask.float().clamp(0, 1) * 2 - 1).expand(3, -1, -1))  # white inside
        row += [e.outputs.get(f"{m} t={t}") for _, m in shown_methods]
        rows.append(row)
    at = f"t={starts[examples[0].degradation]}" if one_start else "t as titled"
    columns = ["clean", "artifact"] + (["mask"] if with_mask else [])
    if len(shown_methods) == 1 and shown_methods[0][0] == "whole":
        columns.append(f"refined ({at})")
    else:
        columns += [f"refined, {mode} ({at})" for mode, _ in shown_methods]
    if not result.reference:
        rows = [row[1:] for row in rows]
        columns = columns[1:]
    return image_grid(rows, columns, titles)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG atomically."""
    path = Path(path)
    atomic_write_bytes(path, lambda fh: image.save(fh, format="PNG"))
    return path


def write_report(
    result: SweepResult, outdir: str | os.PathLike, parameters: dict[str, Any] | None = None, title: str | None = None
) -> dict[str, Path]:
    """Write ``sweep.csv``, ``summary.csv``, ``curves.png``, ``realism.png`` (with SWD), ``examples.png`` (with
    examples) and ``sweep.json`` (parameters, methods, start_ts run, notes) into ``outdir``; returns ``{name: path}``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    paths = {
        "csv": write_rows_csv(result, out / "sweep.csv"),
        "summary": write_summary_csv(summary, out / "summary.csv"),
        "plot": plot_curves(result, out / "curves.png", title),
    }
    realism = plot_realism(result, summary, out / "realism.png", title)
    if realism is not None:
        paths["realism"] = realism
    if result.examples:
        paths["grid"] = save_png(example_grid(result.examples), out / "examples.png")
    for name, key in (("realism.png", "realism"), ("examples.png", "grid")):
        if key not in paths and (out / name).is_file():  # an earlier run's figure would pass for this run's
            (out / name).unlink()
    info = {
        "parameters": parameters or {},
        "methods": {name: {"kind": kind, "description": d} for name, (kind, d) in result.methods.items()},
        "start_ts": {name: list(ts) for name, ts in result.start_ts.items()},
        "degradations": result.degradations,
        "reference": result.reference,
        "notes": result.notes + summary_notes(summary),
    }
    atomic_write_bytes(out / "sweep.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
    paths["json"] = out / "sweep.json"
    return paths
