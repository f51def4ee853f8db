"""The quick start's headline, printed and as Markdown: one line or table row per artifact from its sweep's summary and
cross-fitted best ``start_t``; every figure a mean with its 95 % bootstrap interval over images."""

from __future__ import annotations

from typing import Any

import torch

from ldm.eval.baselines import autoencoder_baseline
from ldm.eval.metrics import psnr
from ldm.eval.stats import bootstrap_mean
from ldm.eval.summary import BestStart, format_entry
from ldm.eval.sweep import SweepResult

REGION = "experts (region)"  # the sweep's method name of the region refinement
_ci = format_entry  # short: the table rows below call it many times


def first_stage_round_trip(model: Any, domain: Any, size: int, n: int) -> str:
    """The first stage's round trip on ``n`` held-out images of ``size`` px of a quick-start ``domain`` (with
    ``images(n, size, seed)`` and ``what``), as a line."""
    clean = torch.cat([im.image for im in domain.images(n, size, seed=0)])
    round_trip = autoencoder_baseline(model)
    decoded = torch.cat([round_trip(clean[i : i + 32]) for i in range(0, n, 32)])
    interval = bootstrap_mean(psnr(decoded, clean).double().numpy())
    return (
        f"first stage round trip on {n} held-out {size}x{size} {domain.what} (never trained on): "
        f"PSNR {interval.format()} dB (mean [95 % bootstrap interval])"
    )


def _entry(summary: list[dict[str, Any]], degradation: str, method: str, start_t: int | None) -> dict[str, Any]:
    found = [s for s in summary if (s["degradation"], s["method"], s["start_t"]) == (degradation, method, start_t)]
    return found[0] if found else {}


def headline_line(
    summary: list[dict[str, Any]],
    result: SweepResult,
    degradation: str,
    best: BestStart | None,
    over_trip: BestStart | None,
    start_t: int,
) -> str:
    """One line: the artifact, the region refinement at its cross-fitted best start_t (in-box PSNR to the clean image
    and to the first stage's round trip of it, gains, realism), each with its 95 % bootstrap interval; for an artifact
    without a box, the whole-image refinement at ``start_t``."""
    artifact = _entry(summary, degradation, "identity", None)
    region_ts = result.start_ts.get(REGION, ())
    if best is None and region_ts:  # the control: nothing wrong in the box, so what refining it costs at each start_t
        curve = ", ".join(f"{t}: {_ci(_entry(summary, degradation, REGION, t), 'psnr_clean_in')}" for t in region_ts)
        n = _entry(summary, degradation, REGION, region_ts[0]).get("n")
        return f"{degradation} (control, nothing wrong in the box, n={n}): PSNR to clean inside the box by start_t {curve} dB"
    if best is None:  # no box: the whole-image figures at start_t
        whole = _entry(summary, degradation, "experts", start_t)
        return (
            f"{degradation} (artifact -> whole, start_t={start_t}, n={whole.get('n')}): PSNR to clean "
            f"{_ci(artifact, 'psnr_clean')} -> {_ci(whole, 'psnr_clean')} dB, gain "
            f"{_ci(whole, 'gain_psnr_clean', sign=True)} dB; SWD x1e3 {_ci(artifact, 'swd')} -> {_ci(whole, 'swd')}"
        )
    region = _entry(summary, degradation, REGION, best.start_ts[0])
    starts = "/".join(dict.fromkeys(str(t) for t in best.start_ts))
    return (
        f"{degradation} (n={best.value.n}, region refinement at its best start_t {starts}): PSNR to clean inside the box "
        f"{best.baseline_value.format()} -> {best.value.format()} dB, gain {best.gain.format('{:+.2f}')} dB; "
        f"over the first stage's round trip {over_trip.gain.format('{:+.2f}') if over_trip else 'n/a'} dB; "
        f"SWD x1e3 {_ci(artifact, 'swd')}"
        f" -> {_ci(region, 'swd')}, change {_ci(region, 'gain_swd', sign=True)}; PSNR to input outside the box "
        f"{_ci(region, 'psnr_input_out', '{:.1f}')} dB"
    )


def markdown_table(
    summary: list[dict[str, Any]],
    result: SweepResult,
    best: dict[str, BestStart | None],
    over_trip: dict[str, BestStart | None],
) -> str:
    """The headline as a Markdown table (what README shows): one row per artifact with a box."""
    lines = [
        "| artifact | n | PSNR in box: artifact | round trip | region refinement (start_t) | gain | gain over the round "
        "trip | SWD ×10³: artifact → region | ΔSWD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    region_ts = result.start_ts.get(REGION, ())
    for degradation in result.degradations:
        pick = best.get(degradation)
        artifact = _entry(summary, degradation, "identity", None)
        trip = _entry(summary, degradation, "autoencoder", None)
        control = _entry(summary, degradation, REGION, region_ts[0]) if region_ts else {}
        if pick is None and control:
            lines.append(
                f"| {degradation.split(':')[0]} (control: nothing wrong) | {control.get('n')} | exact | "
                f"{_ci(trip, 'psnr_clean_in', '{:.1f}')} | {_ci(control, 'psnr_clean_in', '{:.1f}')} ({region_ts[0]}) | "
                f"n/a | n/a | {_ci(artifact, 'swd', '{:.1f}')} → "
                f"{_ci(control, 'swd', '{:.1f}')} | {_ci(control, 'gain_swd', '{:.1f}', True)} |"
            )
        if pick is None:
            continue
        region = _entry(summary, degradation, REGION, pick.start_ts[0])
        starts = "/".join(dict.fromkeys(str(t) for t in pick.start_ts))
        lines.append(
            f"| {degradation.split(':')[0]} | {pick.value.n} | {pick.baseline_value.format('{:.1f}')} | "
            f"{_ci(trip, 'psnr_clean_in', '{:.1f}')} | {pick.value.format('{:.1f}')} ({starts}) | "
            f"{pick.gain.format('{:+.2f}')} | "
            f"{over_trip[degradation].gain.format('{:+.2f}') if over_trip.get(degradation) else 'n/a'} | "
            f"{_ci(artifact, 'swd', '{:.1f}')} → {_ci(region, 'swd', '{:.1f}')} | {_ci(region, 'gain_swd', '{:.1f}', True)} |"
        )
    return "\n".join(lines) + "\n"
