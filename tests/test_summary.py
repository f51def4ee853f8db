"""The sweep's summary (ldm/eval/summary.py): intervals, paired gains, the cross-fitted best start; and the sweep's
region-only mode and round-trip columns that feed it (ldm/eval/sweep.py)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from ldm.eval.baselines import autoencoder_baseline, identity_baseline
from ldm.eval.metrics import Skipped, masked_metrics, psnr
from ldm.eval.report import before_after_grid, format_table, write_summary_csv
from ldm.eval.sources import synthetic_images
from ldm.eval.stats import bootstrap_mean, bootstrap_paired_difference
from ldm.eval.summary import best_start, compare_best, format_entry, summarize, summary_notes
from ldm.eval.sweep import SweepResult, build_sweep_degradation, run_sweep
from ldm.refine import Refiner

DDIM_STEPS = 20


def _row(image: str, method: str, start_t: int | None, value: float, kind: str = "refiner", seed: int = 0) -> dict:
    return {
        "image": image,
        "degradation": "d",
        "method": method,
        "kind": kind,
        "start_t": start_t,
        "effective_start": start_t,
        "seed": seed,
        "seconds": 0.0,
        "psnr_clean_in": value,
    }


def _result(rows: list[dict]) -> SweepResult:
    methods = {"identity": ("baseline", ""), "r (region)": ("refiner", "")}
    return SweepResult(rows, [], [], methods, {"r (region)": (10, 20)}, ["d"], True, [])


def test_best_start_is_chosen_on_one_half_and_reported_on_the_other():
    # images a0..a7: the artifact at 10 dB; start 10 helps the even-named images, start 20 the odd ones
    rows = []
    for i in range(8):
        name = f"a{i}"
        rows.append(_row(name, "identity", None, 10.0, "baseline"))
        rows.append(_row(name, "r (region)", 10, 14.0 if i % 2 == 0 else 11.0))
        rows.append(_row(name, "r (region)", 20, 11.0 if i % 2 == 0 else 16.0))
    best = best_start(_result(rows), "r (region)", "d")
    # halves by name order: even positions (a0, a2, ...) choose 10, odd ones choose 20; each half is then reported at
    # the other half's choice: the even images at 20 (11 dB), the odd ones at 10 (11 dB)
    assert best.start_ts == (10, 20)
    assert best.value.estimate == pytest.approx(11.0) and best.gain.estimate == pytest.approx(1.0)
    assert best.baseline_value.estimate == pytest.approx(10.0) and best.value.n == 8
    # the in-sample best would have claimed 14 and 16 dB: the cross-fit does not reward picking by luck
    assert set(best.per_case.values()) == {11.0}


def test_best_start_and_compare_pair_by_image():
    rows = []
    for i in range(6):
        rows.append(_row(f"i{i}", "identity", None, 10.0 + i, "baseline"))
        rows.append(_row(f"i{i}", "r (region)", 10, 12.0 + i))
        rows.append(_row(f"i{i}", "r (region)", 20, 11.0 + i))
        rows.append({**_row(f"i{i}", "s (region)", 10, 11.5 + i)})
    result = _result(rows)
    a, b = best_start(result, "r (region)", "d"), best_start(result, "s (region)", "d")
    assert a.start_ts == (10, 10) and a.gain.lo == a.gain.hi == pytest.approx(2.0)
    difference = compare_best(a, b)
    assert difference.estimate == pytest.approx(0.5) and difference.lo == pytest.approx(0.5)
    # infinite values (an artifact that changed nothing) leave their case out; fewer than 2 cases: no answer
    rows = [
        _row("x", "identity", None, math.inf, "baseline"),
        _row("x", "r (region)", 10, 5.0),
        _row("y", "identity", None, 3.0, "baseline"),
        _row("y", "r (region)", 10, 5.0),
    ]
    assert best_start(_result(rows), "r (region)", "d") is None


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu", batch_invariant=False)


@pytest.fixture(scope="module")
def region_sweep(refiner):
    """Region refinement only, with the round trip and the realism reference, on 6 synthetic images."""
    images = synthetic_images(6, 32, seed=0)
    degradations = [
        build_sweep_degradation("local_noise:noise_std=0.3,box_size=0.5,box_at=edges"),
        build_sweep_degradation("local_none:box_size=0.5"),
    ]
    round_trip = autoencoder_baseline(refiner.model)
    result = run_sweep(
        [("experts", refiner)],
        images,
        degradations,
        start_ts=[100, 300],
        baselines=[identity_baseline(), round_trip],
        ddim_steps=DDIM_STEPS,
        batch_size=4,
        realism_reference=synthetic_images(6, 32, seed=1),
        whole_image=False,
        round_trip=round_trip,
        n_examples=2,
        example_start_ts=[100, 300],
        progress=False,
    )
    return result, images, degradations, round_trip


def test_region_only_sweep_runs_no_whole_image_refinement(region_sweep):
    result = region_sweep[0]
    assert {r["method"] for r in result.rows} == {"identity", "autoencoder", "experts (region)"}
    assert list(result.methods) == ["identity", "autoencoder", "experts (region)"]
    assert result.start_ts == {"experts (region)": (100, 300)}
    assert all(r["psnr_input_out"] == math.inf for r in result.rows if r["method"] == "experts (region)")


def test_round_trip_columns_compare_with_the_round_trip_of_the_clean_image(region_sweep, refiner):
    result, images, degradations, round_trip = region_sweep
    deg = degradations[0]
    clean = images[2].image
    from ldm.eval.degrade_files import file_seed

    local = deg.degradation.apply_local(clean, file_seed(0, f"{deg.label}/{images[2].name}"))
    trip_clean, trip_input = round_trip(clean), round_trip(local.images)
    (row,) = [
        r
        for r in result.rows
        if r["method"] == "autoencoder" and r["image"] == images[2].name and r["degradation"] == deg.label
    ]
    assert row["psnr_rt"] == pytest.approx(float(psnr(trip_input, trip_clean)[0]), rel=1e-5)
    expected_in = float(masked_metrics(trip_input, trip_clean, local.masks)["psnr_in"][0])
    assert row["psnr_rt_in"] == pytest.approx(expected_in, rel=1e-5)


def test_summary_holds_intervals_and_paired_gains(region_sweep, tmp_path):
    result = region_sweep[0]
    summary = summarize(result, n_resamples=500)
    noise = result.degradations[0]
    entry = next(s for s in summary if (s["degradation"], s["method"], s["start_t"]) == (noise, "experts (region)", 100))
    values = [
        r["psnr_clean_in"]
        for r in result.rows
        if (r["degradation"], r["method"], r["start_t"]) == (noise, "experts (region)", 100)
    ]
    interval = bootstrap_mean(values, n_resamples=500)
    assert entry["n"] == entry["cases"] == entry["psnr_clean_in_n"] == 6
    assert entry["psnr_clean_in"] == pytest.approx(np.mean(values))
    assert (entry["psnr_clean_in_lo"], entry["psnr_clean_in_hi"]) == (pytest.approx(interval.lo), pytest.approx(interval.hi))
    artifact = [r["psnr_clean_in"] for r in result.rows if (r["degradation"], r["method"]) == (noise, "identity")]
    gain = bootstrap_paired_difference(values, artifact, n_resamples=500)
    assert entry["gain_psnr_clean_in"] == pytest.approx(gain.estimate)
    assert entry["gain_psnr_clean_in_lo"] == pytest.approx(gain.lo)
    assert "gain_psnr_rt_in" in entry and entry["gain_swd_lo"] <= entry["gain_swd"] <= entry["gain_swd_hi"]
    assert isinstance(entry["swd"], float) and "swd_lo" not in entry and entry["swd_n"] == entry["gain_swd_n"] == 6
    identity = next(s for s in summary if (s["degradation"], s["method"]) == (noise, "identity"))
    assert "gain_psnr_clean_in" not in identity and "gain_swd" not in identity
    # the control: the identity's in-box PSNR is infinite, so it has no interval and no gains are formed against it
    control = next(s for s in summary if (s["degradation"], s["method"]) == (result.degradations[1], "identity"))
    assert control["psnr_clean_in"] == math.inf and "psnr_clean_in_lo" not in control
    path = write_summary_csv(summary, tmp_path / "summary.csv")
    header = path.read_text().splitlines()[0].split(",")
    for column in ("n", "cases", "psnr_clean_in", "psnr_clean_in_lo", "psnr_clean_in_n", "gain_psnr_clean_in_lo", "gain_swd"):
        assert column in header
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["swd_lo"] == r["swd_hi"] == "" for r in rows)  # the absolute SWD: no interval, blank
    assert any("SWD has no interval" in note for note in summary_notes(summary))


def test_before_after_takes_a_start_per_artifact(region_sweep):
    result = region_sweep[0]
    one = before_after_grid(result, "experts", 100)
    per = before_after_grid(result, "experts", {d: t for d, t in zip(result.degradations, (300, 100))})
    assert one.size == per.size  # clean | artifact | mask | region, 2 examples x 2 artifacts
    only = before_after_grid(result, "experts", {result.degradations[0]: 300})
    assert only.height < one.height
    with pytest.raises(ValueError, match="example_start_ts"):
        before_after_grid(result, "experts", 200)
    assert torch.is_tensor(result.examples[0].outputs["experts (region) t=300"])


def test_format_entry_writes_the_interval_where_there_is_one():
    entry = {"gain": 1.234, "gain_lo": 0.5, "gain_hi": 2.0, "psnr": float("inf"), "n": 3}
    assert format_entry(entry, "gain") == "1.23 [0.50, 2.00]"
    assert format_entry(entry, "gain", "{:.1f}", sign=True) == "+1.2 [+0.5, +2.0]"
    assert format_entry(entry, "psnr") == "inf"  # no interval: the value alone
    assert format_entry(entry, "swd") == "n/a" and format_entry(entry, "n", missing="-") == "-"
    assert format_entry({"x": 2.0, "x_lo": math.nan, "x_hi": math.nan}, "x") == "2.00"  # NaN: no interval


# ---------------------------------------------------------------------------------------------------------------------
# n counts images: seeds, one image, skipped cells


def _seeded(n_images: int, seeds: tuple[int, ...], noise: float = 0.0, rng: np.random.Generator | None = None) -> list:
    """The artifact at 10 dB + image i, a refiner at start 10 gaining 1 + image i / 4 (+ per-seed ``noise``)."""
    rows = []
    for i in range(n_images):
        for seed in seeds:
            extra = float(rng.normal(0.0, noise)) if rng is not None else 0.0
            rows.append(_row(f"im{i}", "identity", None, 10.0 + i, "baseline", seed))
            rows.append(_row(f"im{i}", "r (region)", 10, 11.0 + i + i / 4 + extra, seed=seed))
    return rows


def test_seeds_that_repeat_the_same_rows_leave_n_and_the_intervals_unchanged():
    one, three = summarize(_result(_seeded(5, (0,)))), summarize(_result(_seeded(5, (0, 1, 2))))
    for a, b in zip(one, three):  # a deterministic method: the two extra seeds are exact copies
        assert b["n"] == a["n"] == 5 and b["cases"] == 15 and b["seeds"] == 3 and b["psnr_clean_in_n"] == 5
        for column in ("psnr_clean_in", "psnr_clean_in_lo", "psnr_clean_in_hi"):
            assert b[column] == pytest.approx(a[column])
    refined = three[1]
    assert (refined["gain_psnr_clean_in_lo"], refined["gain_psnr_clean_in_hi"]) == (
        pytest.approx(one[1]["gain_psnr_clean_in_lo"]),
        pytest.approx(one[1]["gain_psnr_clean_in_hi"]),
    )
    assert refined["gain_psnr_clean_in_n"] == 5
    assert any("n = 5 images × 3 seeds" in note for note in summary_notes(three))


def test_one_image_has_no_interval_and_the_notes_say_why(tmp_path):
    summary = summarize(_result(_seeded(1, (0, 1))))
    refined = summary[1]
    assert refined["n"] == 1 and refined["cases"] == 2 and refined["psnr_clean_in"] == pytest.approx(11.0)
    assert not any(k.endswith(("_lo", "_hi")) for k in refined)  # no zero-width "95 %" interval
    assert format_entry(refined, "gain_psnr_clean_in") == "1.00"
    notes = summary_notes(summary)
    assert sum("no interval where fewer than 2 images" in note for note in notes) == 1
    lines = write_summary_csv(summary, tmp_path / "summary.csv").read_text().splitlines()
    header, row = lines[0].split(","), dict(zip(lines[0].split(","), lines[2].split(",")))
    assert "psnr_clean_in_lo" in header and row["psnr_clean_in_lo"] == row["psnr_clean_in_hi"] == ""
    assert row["psnr_clean_in_n"] == "1" and row["n"] == "1" and row["cases"] == "2"
    assert "no interval where fewer than 2 images" in format_table(summary)


def test_intervals_over_few_images_carry_a_note_that_they_are_too_narrow():
    few, many = summarize(_result(_seeded(6, (0,)))), summarize(_result(_seeded(12, (0,))))
    assert any("are too narrow" in note and "n = 6" in note for note in summary_notes(few))
    assert not any("too narrow" in note for note in summary_notes(many))


def test_a_skipped_cell_is_not_counted_in_its_column():
    rows = []
    for i, ssim in enumerate([0.5, 0.7, Skipped("SSIM: image under 11 px")]):
        rows.append({**_row(f"im{i}", "identity", None, 10.0 + i, "baseline"), "ssim_clean": ssim})
    (entry,) = summarize(_result(rows))
    expected = bootstrap_mean([0.5, 0.7])
    assert entry["n"] == entry["psnr_clean_in_n"] == 3 and entry["ssim_clean_n"] == 2
    assert entry["ssim_clean"] == pytest.approx(0.6)
    assert (entry["ssim_clean_lo"], entry["ssim_clean_hi"]) == (pytest.approx(expected.lo), pytest.approx(expected.hi))
    assert "(n=2)" in format_table([entry])  # the column averages fewer images than the row's n


def test_best_start_splits_images_so_no_seed_leaks_its_choice():
    """Truth: every start_t's mean gain is 0; each image has its own effect per start_t, shared by its seeds.  Halves
    that split one image's seeds choose and report on the same images (the defect, rebuilt here by naming each
    (image, seed) as an image of its own): the gain is inflated and its interval misses 0 too often."""
    rng = np.random.default_rng(0)
    gains, covered, leaked = [], 0, []
    trials, ts = 40, (10, 20, 30, 40)
    for _ in range(trials):
        rows = []
        for i in range(16):
            effect = {t: rng.normal() for t in ts}
            for seed in (0, 1):
                rows.append(_row(f"im{i:02d}", "identity", None, 20.0, "baseline", seed))
                rows += [_row(f"im{i:02d}", "r (region)", t, 20.0 + effect[t] + 0.1 * rng.normal(), seed=seed) for t in ts]
        best = best_start(_result(rows), "r (region)", "d")
        assert best.gain.n == 16 and best.gain.cases == 32
        gains.append(best.gain.estimate)
        covered += best.gain.lo <= 0.0 <= best.gain.hi
        split_seeds = [{**r, "image": f"{r['image']}/{r['seed']}"} for r in rows]
        leaked.append(best_start(_result(split_seeds), "r (region)", "d").gain.estimate)
    # by image: unbiased (sd of the mean over 40 trials about 0.04); by case: the in-sample best of four, about +0.25
    assert abs(np.mean(gains)) < 0.1 and np.mean(leaked) > 0.15
    assert covered / trials >= 0.85
