"""Set-level metrics of the sweep (:mod:`ldm.eval.sweep`), one entry ``{"method", "degradation", "start_t", ...}`` per
method x degradation x start_t: FID/KID against the clean images, SWD against an independent clean set.  The sweep's
``sets`` hold every output as uint8 (what a saved image holds): ``{(method, degradation, start_t): [[3, H, W], ...]}``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from ldm.eval.metrics import Skipped, fid_kid
from ldm.eval.swd import PreparedReference, prepare_reference, swd_bootstrap
from ldm.imageio import from_uint8

SWD_SCALE = 1e3  # the sweep reports SWD x 10^3, as Karras et al. 2018 do
SetKey = tuple[str, str, "int | None"]


def _cycled(reference: torch.Tensor, n: int) -> torch.Tensor:
    return reference[torch.arange(n) % reference.shape[0]]


def add_swd(
    set_metrics: list[dict[str, Any]],
    sets: dict[SetKey, list[torch.Tensor]],
    realism: torch.Tensor,
    clean: Sequence[tuple[str, str, torch.Tensor]],
    notes: list[str],
) -> None:
    """Join ``swd`` (x 10^3) of every set's outputs against ``realism`` ``[K, 3, H, W]`` (cycled to the set's size)
    into ``set_metrics`` (new entries are appended), with its bootstrap interval ``swd_lo`` / ``swd_hi`` and the
    :class:`~ldm.eval.swd.SWDBootstrap` itself (``swd_bootstrap``: every set of the same cases is resampled alike, so
    two sets' difference has a paired interval).  ``clean`` holds the cases' ``(degradation, image, clean image)``;
    the SWD of the distinct clean images against ``realism``, the floor that sampling noise sets, goes into ``notes``."""
    entries = {(e["method"], e["degradation"], e["start_t"]): e for e in set_metrics}
    prepared: dict[int, PreparedReference] = {}  # the reference side, once per set size
    for key, outputs in sets.items():
        fake = from_uint8(torch.stack(outputs))
        if key not in entries:
            entries[key] = {"method": key[0], "degradation": key[1], "start_t": key[2]}
            set_metrics.append(entries[key])
        n = fake.shape[0]
        if n not in prepared:
            prepared[n] = prepare_reference(_cycled(realism, n))
        boot = swd_bootstrap(fake, prepared[n])  # paired with every other set of these cases: summary's gain_swd
        swd, lo, hi = (v * SWD_SCALE for v in (boot.result.mean, boot.interval.lo, boot.interval.hi))
        entries[key].update(swd=swd, swd_lo=lo, swd_hi=hi, swd_bootstrap=boot)
    distinct = {image: x for _, image, x in clean}
    if distinct:
        real = torch.stack(list(distinct.values()))
        floor = swd_bootstrap(real, _cycled(realism, real.shape[0])).interval
        notes.append(
            f"SWD x 10^3 of the {real.shape[0]} clean images against the realism reference: {floor.estimate * SWD_SCALE:.3f} "
            f"[{floor.lo * SWD_SCALE:.3f}, {floor.hi * SWD_SCALE:.3f}] (the floor, 95 % bootstrap interval)"
        )


def fid_kid_metrics(
    sets: dict[SetKey, list[torch.Tensor]],
    rows: Sequence[dict[str, Any]],
    inception: torch.nn.Module | Skipped | None,
    reference: bool,
    clean: Sequence[tuple[str, str, torch.Tensor]],
) -> list[dict[str, Any]]:
    """FID/KID per method x degradation x start_t of ``rows`` against the clean images of that degradation (``clean``:
    the cases' ``(degradation, image, clean image)``); entries hold ``skipped`` (the reason) when they cannot be
    computed.  Empty when ``inception`` is None."""
    if inception is None:
        return []
    keys = list(dict.fromkeys((r["method"], r["degradation"], r["start_t"]) for r in rows))
    if not reference or isinstance(inception, Skipped):
        reason = str(inception) if isinstance(inception, Skipped) else "skipped: FID/KID need clean references"
        return [{"method": m, "degradation": d, "start_t": t, "skipped": reason} for m, d, t in keys]
    real: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for degradation, image, x in clean:
        real[degradation].setdefault(image, x)
    out = []
    for method, degradation, t in keys:
        fake = from_uint8(torch.stack(sets[(method, degradation, t)]))
        reals = torch.stack(list(real[degradation].values()))
        value = fid_kid(reals, fake, feature_extractor=inception, kid_subset_size=min(len(reals), len(fake)))
        entry: dict[str, Any] = {"method": method, "degradation": degradation, "start_t": t}
        if isinstance(value, Skipped):
            entry["skipped"] = str(value)
        else:
            entry.update(value)
        out.append(entry)
    return out
