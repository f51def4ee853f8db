#!/usr/bin/env python
"""Refined bytes of a fixed set of refinement cases, to show that a refactor changed no output.

    python benchmarks/refine_bytes.py --out before.json           # on the old code
    python benchmarks/refine_bytes.py --check before.json         # on the new code: exit 1 on any changed case

Every case refines a held-out photograph crop (scikit-image's ``chelsea``, 76 x 92 px: not a multiple of the model's
size) with the shipped demo experts (``weights/demo``) on the CPU, one thread, and records the sha256 of the refined
pixels (float32 tensor bytes for the Python API, decoded RGB(A) bytes for ``scripts/refine.py``, whose PNGs also carry
metadata that names the output folder).  The cases cover both experts, the grid and exact tails, ``strength``, DDIM with
eta 0 and 1, DPM-Solver++(2M), masks, boxes with their own starts, dilation, feathering, crop mode, batches, RGBA input,
bf16 autocast and the CLI.  CPU runs are bit-reproducible, so any difference is a changed computation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import common

PHOTO_BOX = (100, 60, 176, 152)  # (y0, x0, y1, x1) of chelsea: the cat's face, 76 x 92 px


def photo():
    """The crop as a PIL RGB image."""
    from PIL import Image
    from skimage import data

    y0, x0, y1, x1 = PHOTO_BOX
    return Image.fromarray(data.chelsea()[y0:y1, x0:x1])


def api_cases() -> dict[str, Callable]:
    """Name -> function(refiner) returning a tensor or a PIL image."""
    import numpy as np
    import torch

    from ldm.imageio import image_to_tensor
    from ldm.refine.regions import Box

    img = photo()
    x = image_to_tensor(np.asarray(img))
    w, h = img.size
    grey = np.tile(np.linspace(0, 255, w, dtype=np.float64), (h, 1)).round().astype(np.uint8)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    return {
        "whole_t50": lambda r: r.refine_tensors(x, 50),
        "whole_t200": lambda r: r.refine_tensors(x, 200),
        "whole_t400_two_experts": lambda r: r.refine_tensors(x, 400),
        "strength_0.15": lambda r: r.refine_tensors(x, strength=0.15),
        "tail_steps_5_t120": lambda r: r.refine_tensors(x, 120, tail_steps=5),
        "dpmpp_t300": lambda r: r.refine_tensors(x, 300, sampler="dpmpp_2m"),
        "dpmpp_tail_7_t300": lambda r: r.refine_tensors(x, 300, sampler="dpmpp_2m", tail_steps=7),
        "eta1_t200_seed3": lambda r: r.refine_tensors(x, 200, seeds=3, eta=1.0),
        "ddim25_t300": lambda r: r.refine_tensors(x, 300, ddim_steps=25),
        "batch2_seeds": lambda r: r.refine_tensors(torch.cat([x, x.flip(-1)]), 150, seeds=[1, 2]),
        "batch2_same_image": lambda r: r.refine_tensors(torch.cat([x, x]), 150, seeds=[4, 5]),
        "box_t200": lambda r: r(img, 200, boxes=[Box(10, 12, 50, 60)]),
        "box_own_start": lambda r: r(img, 100, boxes=[Box(10, 12, 50, 60, 300), Box(60, 50, 88, 74)]),
        "grey_mask_t250": lambda r: r(img, 250, mask=grey),
        "mask_dilate3_blur0": lambda r: r(img, 200, boxes=[Box(20, 20, 40, 40)], mask_dilate=3, mask_blur=0),
        "crop_box": lambda r: r(img, 200, boxes=[Box(10, 12, 50, 60)], crop_regions=True),
        "crop_two_boxes_pad8_size48": lambda r: r(
            img, 250, boxes=[Box(4, 4, 24, 30), Box(60, 40, 88, 70)], crop_regions=True, region_padding=8, region_size=48
        ),
        "crop_tail_dpmpp": lambda r: r(
            img, 300, boxes=[Box(10, 12, 50, 60)], crop_regions=True, tail_steps=4, sampler="dpmpp_2m"
        ),  # fmt: skip
        "strength_box": lambda r: r(img, strength=0.2, boxes=[Box(10, 12, 50, 60)]),
        "rgba_t150_seed9": lambda r: r(rgba, 150, seed=9),
    }


def digest(value) -> str:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        array = value.detach().to("cpu", torch.float32).contiguous().numpy()
    else:
        array = np.asarray(value)
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


def cli_cases(tmp: Path) -> dict[str, list[str]]:
    """Name -> extra refine.py arguments (the input and mask are written into ``tmp``)."""
    from PIL import Image

    photo().save(tmp / "cat.png")
    mask = Image.new("L", photo().size, 0)
    mask.paste(255, (8, 8, 48, 56))
    mask.save(tmp / "mask.png")
    return {
        "cli_whole_t100": ["--start-t", "100"],
        "cli_mask_t200": ["--start-t", "200", "--mask", str(tmp / "mask.png")],
        "cli_box_crop_samples2": [
            "--start-t",
            "250",
            "--box",
            "10,12,50,60@300",
            "--crop-regions",
            "--n-samples",
            "2",
            "--seed",
            "5",
        ],  # fmt: skip
        "cli_strength_tail_dpmpp": ["--strength", "0.3", "--tail-steps", "6", "--sampler", "dpmpp_2m"],
    }


def run_cli(name: str, args: list[str], tmp: Path) -> str:
    from PIL import Image

    out = tmp / name
    cmd = [sys.executable, str(common.REPO / "scripts" / "refine.py"), "--input", str(tmp / "cat.png"), "--outdir",
           str(out), "--ckpt", "demo", "--device", "cpu", *args]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=common.REPO)
    hashes = [hashlib.sha256(Image.open(p).tobytes()).hexdigest() for p in sorted(out.glob("*.png"))]
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write {case: sha256} here")
    p.add_argument("--check", type=Path, help="compare with a file written by --out; exit 1 on any difference")
    p.add_argument("--no-cli", action="store_true", help="skip the refine.py cases (each loads the experts anew)")
    args = p.parse_args()
    common.set_threads(1)
    from ldm.refine import Refiner

    results: dict[str, str] = {}
    refiner = Refiner.from_checkpoints("demo", device="cpu")
    for name, case in api_cases().items():
        results[name] = digest(case(refiner))
    bf16 = Refiner.from_checkpoints("demo", device="cpu", precision="bf16")
    x = api_cases()
    results["bf16_whole_t200"] = digest(x["whole_t200"](bf16))
    if not args.no_cli:
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in cli_cases(Path(tmp)).items():
                results[name] = run_cli(name, extra, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.check:
        before = json.loads(args.check.read_text())
        changed = sorted(k for k in before if k in results and results[k] != before[k])  # --no-cli runs fewer
        for name in sorted(results):
            state = "new" if name not in before else ("CHANGED" if name in changed else "same")
            print(f"{name:32s} {state}")
        print(f"{len(results)} cases, {len(changed)} changed")
        return 1 if changed else 0
    print(f"{len(results)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
