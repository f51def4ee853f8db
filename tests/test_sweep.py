"""The evaluation sweep (ldm/eval/sweep.py): rows, metrics against independent computations, CSV/plot/grid files,
no-reference mode.  Its CLI (scripts/evaluate.py) is tested in test_evaluate_cli.py, the baselines in test_baselines.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.baselines import default_baselines, identity_baseline
from ldm.eval.degrade import JPEG
from ldm.eval.degrade_files import file_seed
from ldm.eval.metrics import Skipped, seam_energy
from ldm.eval.report import before_after_grid, example_grid, format_table, write_report
from ldm.eval.sources import folder_images, heldout_images
from ldm.eval.summary import summarize
from ldm.eval.sweep import METRIC_COLUMNS, build_sweep_degradation, run_sweep
from ldm.refine import Refiner

DDIM_STEPS = 20  # grid 1, 51, 101, ...: start_t 100 -> t=51, 300 -> t=251


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def two_images():
    return heldout_images(2, 32, seed=3)


@pytest.fixture(scope="module")
def sweep(refiner, two_images):
    """Two degradations x two images x two seeds; start_t 600 lies outside the experts' windows ([0, 500))."""
    degradations = [
        build_sweep_degradation("jpeg:quality=10"),
        build_sweep_degradation("vq_roundtrip:codebook_fraction=0.25", refiner.model.first_stage_model),
    ]
    result = run_sweep(
        [("experts", refiner)],
        two_images,
        degradations,
        start_ts=[300, 100, 600],
        seeds=[0, 1],
        baselines=default_baselines(refiner.model, "median"),
        ddim_steps=DDIM_STEPS,
        batch_size=3,
        lpips=Skipped("LPIPS: no weights in this test"),
        n_examples=1,
        progress=False,
    )
    return result, degradations


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------------------------------
# the sweep itself


def test_rows_cover_every_case_method_and_start_t(sweep, two_images):
    result, degradations = sweep
    rows = result.rows
    # 2 degradations x 2 images x 2 seeds = 8 cases; 3 baselines once, the refiner at 100 and 300 (600 skipped)
    assert len(rows) == 8 * (3 + 2)
    keys = {(r["degradation"], r["image"], r["seed"], r["method"], r["start_t"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["method"] for r in rows} == {"identity", "median", "autoencoder", "experts"}
    assert {r["start_t"] for r in rows if r["method"] == "experts"} == {100, 300}
    assert {r["effective_start"] for r in rows if r["start_t"] == 100} == {51}
    assert {r["effective_start"] for r in rows if r["start_t"] == 300} == {251}
    assert all(r["start_t"] is None and r["effective_start"] is None for r in rows if r["kind"] == "baseline")
    assert result.start_ts == {"experts": (100, 300)}
    assert any("start_t=600 skipped" in note for note in result.notes)
    assert any("LPIPS: no weights in this test" in note for note in result.notes)
    assert result.degradations == [d.label for d in degradations]
    assert degradations[1].label == "vq_roundtrip:first_stage=model,codebook_fraction=0.25"


def test_identity_rows_match_metrics_computed_by_hand(sweep, two_images):
    result, degradations = sweep
    jpeg = degradations[0]
    for image in two_images:
        for seed in (0, 1):
            (row,) = [
                r
                for r in result.rows
                if (r["method"], r["image"], r["seed"], r["degradation"]) == ("identity", image.name, seed, jpeg.label)
            ]
            degraded = JPEG(10)(image.image, 0)[0].double()
            clean = image.image[0].double()
            mse = float(((degraded - clean) ** 2).mean())
            assert row["mse_clean"] == pytest.approx(mse, rel=1e-9)
            assert row["psnr_clean"] == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-6)
            assert row["psnr_input"] == math.inf and row["mse_input"] == 0.0
            assert isinstance(row["lpips_clean"], Skipped)


def test_refiner_rows_are_the_refiner_outputs_with_the_case_seed(sweep, refiner, two_images):
    result, degradations = sweep
    vq = degradations[1]
    image = two_images[1]
    seed = 1
    degraded = vq.degradation(image.image, file_seed(seed, f"{vq.label}/{image.name}"))
    refined = refiner.refine_tensors(degraded, 300, [seed], DDIM_STEPS)
    (row,) = [
        r
        for r in result.rows
        if r["method"] == "experts"
        and r["start_t"] == 300
        and r["image"] == image.name
        and r["seed"] == seed
        and r["degradation"] == vq.label
    ]
    expected_clean = float(((refined.double() - image.image.double()) ** 2).mean())
    expected_input = float(((refined.double() - degraded.double()) ** 2).mean())
    assert row["mse_clean"] == pytest.approx(expected_clean, rel=1e-6)
    assert row["mse_input"] == pytest.approx(expected_input, rel=1e-6)


def test_summary_means_the_rows(sweep):
    result, _ = sweep
    summary = summarize(result)
    assert len(summary) == 2 * (3 + 2)
    for entry in summary:
        rows = [
            r
            for r in result.rows
            if (r["degradation"], r["method"], r["start_t"]) == (entry["degradation"], entry["method"], entry["start_t"])
        ]
        assert entry["cases"] == len(rows) == 4 and entry["n"] == entry["psnr_clean_n"] == 2  # 2 images x 2 seeds
        assert entry["psnr_clean"] == pytest.approx(np.mean([r["psnr_clean"] for r in rows]))
        assert isinstance(entry["lpips_clean"], Skipped)
    table = format_table(summary)
    assert table.count("degradation: ") == 2 and "experts" in table and "PSNR->clean" in table
    assert "note: n counts images (n = 2 images × 2 seeds" in table and "are too narrow" in table


def test_degradation_seeds_do_not_depend_on_the_other_images(refiner, two_images):
    deg = build_sweep_degradation("blur_noise:sigma=1.0,noise_std=0.1")
    kwargs = dict(start_ts=[100], seeds=[4], baselines=[identity_baseline()], ddim_steps=DDIM_STEPS, progress=False)
    both = run_sweep([], two_images, [deg], **kwargs)
    second = run_sweep([], two_images[1:], [deg], **kwargs)
    row_both = [r for r in both.rows if r["image"] == two_images[1].name]
    assert row_both[0]["mse_clean"] == second.rows[0]["mse_clean"]


class MeanColourFeatures(torch.nn.Module):
    """Stand-in for the Inception network: uint8 [n, 3, H, W] -> per-channel means and stds [n, 6]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_kid_per_method_degradation_and_start_t(refiner):
    images = heldout_images(3, 32, seed=1)
    deg = build_sweep_degradation("blur_noise:sigma=1.0,noise_std=0.1")
    result = run_sweep(
        [("experts", refiner)],
        images,
        [deg],
        start_ts=[100],
        seeds=[0, 1],
        baselines=[identity_baseline()],
        ddim_steps=DDIM_STEPS,
        inception=MeanColourFeatures(),
        progress=False,
    )
    assert [(s["method"], s["start_t"]) for s in result.set_metrics] == [("identity", None), ("experts", 100)]
    identity = result.set_metrics[0]
    from ldm.eval.metrics import fid_kid

    clean = torch.cat([im.image for im in images])
    degraded = torch.cat([deg.degradation(im.image, file_seed(s, f"{deg.label}/{im.name}")) for im in images for s in (0, 1)])
    expected = fid_kid(clean, degraded, feature_extractor=MeanColourFeatures(), kid_subset_size=3)
    assert identity["fid"] == pytest.approx(expected["fid"], rel=1e-3, abs=1e-6)
    summary = summarize(result)
    assert all("fid" in s and "kid_mean" in s for s in summary)
    assert "FID" in format_table(summary)
    skipped = run_sweep(
        [],
        images[:2],
        [deg],
        start_ts=[100],
        baselines=[identity_baseline()],
        inception=Skipped("FID/KID: no weights"),
        progress=False,
    )
    assert skipped.set_metrics == [
        {"method": "identity", "degradation": deg.label, "start_t": None, "skipped": "skipped: FID/KID: no weights"}
    ]


def test_local_degradations_measure_inside_outside_and_the_seam(refiner, two_images):
    """A local artifact's case carries its box: the identity baseline is exact outside it and has no seam; the
    artifact lowers PSNR to clean inside the box only."""
    deg = build_sweep_degradation("local_blotch:strength=0.8")
    result = run_sweep(
        [("experts", refiner)],
        two_images,
        [deg],
        start_ts=[100],
        baselines=[identity_baseline()],
        ddim_steps=DDIM_STEPS,
        progress=False,
    )
    identity = [r for r in result.rows if r["method"] == "identity"]
    for row in identity:
        assert row["psnr_input_in"] == math.inf and row["psnr_input_out"] == math.inf and row["seam"] == 0.0
        assert row["psnr_clean_in"] < row["psnr_clean"] < 60
    for image in two_images:
        local = deg.degradation.apply_local(image.image, file_seed(0, f"{deg.label}/{image.name}"))
        (row,) = [r for r in identity if r["image"] == image.name]
        inside = local.masks[0, 0].bool()
        err = ((local.images[0] - image.image[0]).double() ** 2)[:, inside].mean()
        assert row["psnr_clean_in"] == pytest.approx(10 * math.log10(4.0 / float(err)), rel=1e-9)
    refined = [r for r in result.rows if r["method"] == "experts"]
    assert all(r["seam"] >= 0 and math.isfinite(r["psnr_input_out"]) for r in refined)
    assert result.examples[0].mask is not None and result.examples[0].mask.shape == (1, 32, 32)


def test_region_refinement_keeps_every_pixel_outside_the_box_and_leaves_a_smaller_seam(refiner, two_images):
    """``experts (region)`` is the refiner with a start map of start_t inside the box and 0 outside: its output is
    the input bit for bit outside the box (PSNR to input there: inf); its edit fades out at the box's edge, so its
    seam energy is below that of the whole-image refinement hard-pasted into the box.  The before/after grid shows
    clean | artifact | mask | whole | region | crop (the modes that ran)."""
    deg = build_sweep_degradation("local_warp:amplitude=0.2")
    t = 300
    result = run_sweep(
        [("experts", refiner)],
        two_images,
        [deg],
        start_ts=[t],
        baselines=[identity_baseline()],
        ddim_steps=DDIM_STEPS,
        n_examples=2,
        example_start_ts=[t],
        region_modes=("region", "crop"),
        progress=False,
    )
    assert list(result.methods) == ["identity", "experts", "experts (region)", "experts (crop)"]
    assert result.start_ts["experts (region)"] == (t,)
    region = {r["image"]: r for r in result.rows if r["method"] == "experts (region)"}
    whole = {r["image"]: r for r in result.rows if r["method"] == "experts"}
    assert set(region) == {im.name for im in two_images}
    for image in two_images:
        local = deg.degradation.apply_local(image.image, file_seed(0, f"{deg.label}/{image.name}"))
        x, mask = local.images, local.masks
        expected = refiner.refine_tensors(x, t, [0], DDIM_STEPS, start_map=(mask > 0.5).long() * t)
        example = next(e for e in result.examples if e.image == image.name)
        assert (example.outputs[f"experts (region) t={t}"] - expected[0]).abs().max() < 1e-5  # batched vs alone
        outside = mask[0, 0] == 0
        assert torch.equal(expected[0][:, outside], x[0][:, outside])
        assert region[image.name]["psnr_input_out"] == math.inf
        whole_out = example.outputs[f"experts t={t}"].unsqueeze(0)
        pasted = torch.where(mask > 0.5, whole_out, x)
        assert region[image.name]["seam"] == pytest.approx(float(seam_energy(expected, x, mask)[0]), rel=1e-4)
        assert region[image.name]["seam"] < 0.5 * float(seam_energy(pasted, x, mask)[0])
        assert whole[image.name]["psnr_input_out"] < math.inf
        crop = refiner.refine_tensors(x, t, [0], DDIM_STEPS, start_map=(mask > 0.5).long() * t, crop_regions=True)
        assert (example.outputs[f"experts (crop) t={t}"] - crop[0]).abs().max() < 1e-5
        assert torch.equal(crop[0][:, outside], x[0][:, outside])
    grid = before_after_grid(result, "experts", t)
    tile = 128  # 32 px crops upscaled 4x
    assert grid.width == 6 + 6 * (tile + 6)  # clean | artifact | mask | whole | region | crop
    # crop mode alone is shown too (it was left out, mask and all, when the sweep ran no "(region)")
    crop_only = dataclasses.replace(
        result,
        methods={k: v for k, v in result.methods.items() if "(region)" not in k},
        examples=[
            dataclasses.replace(e, outputs={k: v for k, v in e.outputs.items() if "(region)" not in k}) for e in result.examples
        ],
    )
    assert before_after_grid(crop_only, "experts", t).width == 6 + 5 * (tile + 6)
    with pytest.raises(ValueError, match=r"method 'experts \(region\)' is not one of the sweep's refiners"):
        before_after_grid(crop_only, "experts (region)", t)
    with pytest.raises(ValueError, match=r"method 'identity' is not one of the sweep's refiners \['experts', "):
        before_after_grid(result, "identity", t)
    no_region = run_sweep(
        [("experts", refiner)],
        two_images[:1],
        [deg],
        start_ts=[t],
        ddim_steps=DDIM_STEPS,
        region_modes=(),
        example_start_ts=[t],
        progress=False,
    )
    assert list(no_region.methods) == ["experts"]
    assert before_after_grid(no_region, "experts", t).width == 6 + 4 * (tile + 6)  # clean | artifact | mask | whole


def test_swd_realism_against_an_independent_clean_set(two_images, tmp_path):
    deg = build_sweep_degradation("jpeg:quality=10")
    reference = heldout_images(3, 32, seed=9)
    result = run_sweep(
        [],
        two_images,
        [deg],
        start_ts=[100],
        seeds=[0, 1],
        baselines=[identity_baseline()],
        realism_reference=reference,
        progress=False,
    )
    (entry,) = result.set_metrics
    from ldm.eval.swd import swd

    degraded = torch.cat(
        [deg.degradation(im.image, file_seed(s, f"{deg.label}/{im.name}")) for im in two_images for s in (0, 1)]
    )
    quantized = ((degraded.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the sweep keeps outputs as uint8
    cycled = torch.cat([im.image for im in reference])[torch.arange(4) % 3]
    assert entry["swd"] == pytest.approx(swd(quantized, cycled).mean * 1e3, rel=1e-9)
    assert "swd_lo" not in entry and "swd_hi" not in entry  # an absolute SWD has no interval
    # 2 images x 2 seeds: resampled as 2 images; the 3 reference images cycled to 4 members: resampled as 3
    boot = entry["swd_bootstrap"]
    assert (boot.n, boot.cases, boot.reference_n) == (2, 4, 3)
    (floor,) = [note for note in result.notes if "against the realism reference" in note]
    clean = torch.cat([im.image for im in two_images])[torch.arange(4) % 2]
    assert f"{swd(clean, cycled).mean * 1e3:.3f} (the floor" in floor and "[" not in floor  # no interval
    assert any("3 images are cycled to the sets' 4 members" in note for note in result.notes)
    assert "SWDx1e3" in format_table(summarize(result))
    paths = write_report(result, tmp_path)
    with Image.open(paths["realism"]) as im:
        assert im.format == "PNG" and im.width > 100


def test_bad_arguments_are_refused(refiner, two_images):
    deg = [build_sweep_degradation("jpeg")]
    with pytest.raises(ValueError, match="start_t=0"):
        run_sweep([("experts", refiner)], two_images, deg, start_ts=[0], progress=False)
    with pytest.raises(ValueError, match="cannot run any of start_t"):
        run_sweep([("experts", refiner)], two_images, deg, start_ts=[700, 800], ddim_steps=DDIM_STEPS, progress=False)
    with pytest.raises(KeyError, match="unknown degradation"):
        build_sweep_degradation("jpg")
    with pytest.raises(ValueError, match="codebook_fraction"):
        build_sweep_degradation("vq_roundtrip:codebook_fraction=half", refiner.model.first_stage_model)


# ---------------------------------------------------------------------------------------------------------------------
# files


def test_report_files_are_readable(sweep, tmp_path):
    result, _ = sweep
    paths = write_report(result, tmp_path / "out", {"start_t": [100, 300, 600]}, title="test")
    rows = _read_csv(paths["csv"])
    assert len(rows) == len(result.rows)
    header = list(rows[0])
    assert header[:8] == ["image", "degradation", "method", "kind", "start_t", "effective_start", "seed", "seconds"]
    assert set(header[8:]) == set(METRIC_COLUMNS)  # every metric column was computed (LPIPS as "skipped")
    identity = [r for r in rows if r["method"] == "identity"]
    assert all(r["start_t"] == "" and r["psnr_input"] == "inf" and r["lpips_clean"] == "skipped" for r in identity)
    refined = [r for r in rows if r["method"] == "experts"]
    assert sorted({int(r["start_t"]) for r in refined}) == [100, 300]
    assert all(math.isfinite(float(r["psnr_clean"])) for r in refined)

    summary = _read_csv(paths["summary"])
    assert len(summary) == 10 and summary[0]["n"] == "2" and summary[0]["cases"] == "4" and summary[0]["seeds"] == "2"
    info = json.loads(paths["json"].read_text())
    assert any("n = 2 images × 2 seeds" in note for note in info["notes"])
    assert info["start_ts"] == {"experts": [100, 300]} and info["parameters"] == {"start_t": [100, 300, 600]}

    for key in ("plot", "grid"):
        with Image.open(paths[key]) as im:
            im.load()
            assert im.format == "PNG" and im.width > 200 and im.height > 100
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    again = write_report(dataclasses.replace(result, examples=[]), tmp_path / "out")  # the same folder, no examples
    assert "grid" not in again and not (tmp_path / "out" / "examples.png").exists()  # the last run's grid was left


def test_example_grid_has_one_row_per_example_and_labelled_columns(sweep):
    result, _ = sweep
    assert len(result.examples) == 2  # one image per degradation, seed 0
    example = result.examples[0]
    assert list(example.outputs) == ["median", "autoencoder", "experts t=100", "experts t=300"]
    grid = example_grid(result.examples)
    # 6 columns (clean, input, 4 outputs) of 32 px tiles upscaled 4x to 128 px
    assert grid.width == 6 + 6 * (128 + 6)
    tile = np.asarray(grid)[14 + 6 + 14 : 14 + 6 + 14 + 128, 6 : 6 + 128]
    expected = np.repeat(np.repeat(((example.clean.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), 4, 0), 4, 1)
    np.testing.assert_array_equal(tile, expected)


def _write_pngs(folder: Path, n: int = 2, size: int = 24) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"artifact_{i}.png")


def test_no_reference_mode(refiner, tmp_path):
    _write_pngs(tmp_path / "real")
    images = folder_images(tmp_path / "real")
    assert [im.name for im in images] == ["artifact_0.png", "artifact_1.png"]
    result = run_sweep(
        [("experts", refiner)],
        images,
        None,
        start_ts=[100, 300],
        baselines=default_baselines(refiner.model),
        ddim_steps=DDIM_STEPS,
        progress=False,
    )
    assert not result.reference and result.degradations == ["none"]
    assert len(result.rows) == 2 * (3 + 2)
    assert all(not any(k.endswith("_clean") for k in r) for r in result.rows)
    assert all("psnr_input" in r for r in result.rows)
    paths = write_report(result, tmp_path / "out")
    header = list(_read_csv(paths["csv"])[0])
    assert "psnr_input" in header and not any(h.endswith("_clean") for h in header)
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.width > 100
    grid = example_grid(result.examples)
    assert grid.width == 6 + 5 * (max(128, 24 * 6) + 6)  # input + 4 outputs; 24 px upscaled 6x


def test_folder_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        folder_images(tmp_path / "empty")


def test_local_vq_with_the_refiners_first_stage_takes_box_at(refiner):
    """Every local_vq parameter was parsed as a number, so box_at=edges was refused as 'takes numbers'."""
    deg = build_sweep_degradation("local_vq:box_at=edges,box_size=0.5", refiner.model.first_stage_model)
    assert deg.degradation.box_at == "edges" and deg.degradation.box_size == 0.5
    assert "box_at=edges" in deg.label
    with pytest.raises(ValueError, match="local_vq takes numbers"):
        build_sweep_degradation("local_vq:box_size=big", refiner.model.first_stage_model)
