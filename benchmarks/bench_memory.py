#!/usr/bin/env python
"""Peak memory of a large-image refinement: encode -> 2 tail steps -> decode, tiled vs untiled first stage.

    python benchmarks/bench_memory.py                                  # 512 and 1024 px, untiled and auto-tiled
    python benchmarks/bench_memory.py --sizes 1024 --tilings auto --unet tiny
    python benchmarks/bench_memory.py --sizes 2048 --tilings auto 512:128
    python benchmarks/bench_memory.py --unet sd-v1 --tilings off auto --precision fp32 bf16   # Stable Diffusion v1

Every configuration runs in a fresh process, whose peak resident memory (``ru_maxrss``) is the figure; the process
holds the two experts of the real late-steps config (two 274M-parameter UNets, or ``--unet tiny``) sharing one VQ-f4
first stage of the real size (``ch=128, ch_mult=[1, 2, 4]``), all with random weights.  ``model_mib`` is the resident
memory once the models are built, so ``peak_mib - model_mib`` is what the refinement itself needs.  Target: 1024 px
within 6 GB on CPU.

``--unet sd-v1``: one Stable-Diffusion-v1-sized expert instead, built from ``configs/stable-diffusion/v1-inference.yaml``
with random weights (UNet 860M parameters, cross-attention on a ``[B, 77, 768]`` context; KL-f8 ``AutoencoderKL``,
84M), full range ``[0, 1000)``, refined the way users run it: ``Refiner.refine_tensors`` with
``prompt=Prompt(..., guidance_scale=G)`` (``--guidance``, default 7.5: both branches of guidance run; 1 runs the
conditional branch alone), ``tail_steps=2`` from ``start_t=200``.  Guidance makes one batched call of ``2B`` samples,
which the refiner's ``batch_invariant`` (``--batch-invariant``; ``auto``: on for CPU, off for CUDA) splits into calls
of one sample: ``unet_batch`` is the largest batch the UNet saw (1 per-sample, 2 batched, for one image).  The
text encoder (``--text-encoder``): ``clip`` (default) is the real ``FrozenCLIPEmbedder`` with CLIP ViT-L/14's text
config (123M parameters, random weights: a config-only folder with a letters-only tokenizer is written to a temporary
folder, nothing downloaded), so its weights count in ``model_mib`` as they do for a user; ``stub`` (where
``transformers`` is missing) replaces it with a parameter-free module returning a deterministic ``[n, 77, 768]``
embedding per text, so the model is still text-conditioned and guided, but the 0.46 GiB of CLIP weights are not held.
``--unet sd-v1-tiny``: the same structure at tiny sizes (tests).  ``s_step`` is the sampling phase's wall time per
step (both guidance branches), ``last_step_s`` the last step alone (after the first step's allocations).

Tilings: ``off``, ``auto`` (the refiner's default) or ``TILE:OVERLAP[:PASSES]`` in px (tiling images above TILE); a
tiling that would not tile an image of that size is skipped.  Where the untiled run of a size finished, every tiled
output of that size is compared with it: ``max_err`` / ``mean_err`` (in [-1, 1] units) and ``psnr_db``.  Random weights
make this a harsh test (trained first stages have smoother statistics).

``--attention math`` reproduces the state before the attention fix (SDPA on transposed ``q, k, v`` fell back to the
math kernel, which keeps the N x N scores; here forced with ``torch.nn.attention.sdpa_kernel``): 2 x 1 GiB for the
first stage's mid block at 512 px, 2 x 16 GiB at 1024 px.  Each child is capped at ``--max-memory-gib`` of address
space (default 16, 20 for ``sd-v1``; on CPU only) so that an oversized configuration fails with an out-of-memory error
instead of waking the machine's OOM killer.  On CUDA, ``cuda_peak_mib`` / ``cuda_reserved_mib`` are
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (``peak_mib`` stays the host's resident memory).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402 (after the path setup)
    REPO,
    THREADS_HELP,
    build_experts,
    current_rss_mib,
    peak_rss_mib,
    photo_batch,
    report,
    run_child,
    run_script,
    set_threads,
    sync,
)

START_T, DDIM_STEPS = 499, 4  # grid 1, 251, 501, 751: the tail is t=251 (expert [250, 500)) then t=1 (expert [0, 250))
SD_START_T, SD_TAIL_STEPS = 200, 2  # peak memory, not time, is the figure: two steps reach the sampling peak
SD_PROMPT = "a photograph of a lighthouse on a cliff at sunset"
SD_V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
SD_UNETS = ("sd-v1", "sd-v1-tiny")
# CLIP ViT-L/14's text config (openai/clip-vit-large-patch14, SD v1's cond stage; as recorded in
# tests/reference/sd_v1_text_encoder_keys.json), with the special-token ids of the letters-only tokenizer written here
# (ids do not change the sizes)
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# sd-v1-tiny: SD v1's structure (SpatialTransformer with cross-attention, KL first stage, CLIP) at test sizes
TINY_SD_UNET = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "context_dim": 32,
}
TINY_SD_VAE = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 16}
TINY_CLIP_TEXT = {
    **CLIP_L_TEXT,
    "vocab_size": 54,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
}
COLUMNS = [
    "size",
    "tiling",
    "attention",
    "unet",
    "text_encoder",
    "precision",
    "guidance",
    "batching",
    "unet_batch",
    "model_mib",
    "peak_mib",
    "refine_mib",
    "peak_gib",
    "wall_s",
    "encode_s",
    "sample_s",
    "s_step",
    "last_step_s",
    "decode_s",
    "max_err",
    "mean_err",
    "psnr_db",
    "error",
]


def parse_tiling(text: str) -> Any:
    """``off`` -> None, ``auto`` -> "auto", ``TILE:OVERLAP[:PASSES]`` -> the automatic tiling with that geometry (and
    number of statistics passes), tiling images above TILE."""
    import dataclasses

    from ldm.refine.first_stage import AUTO_TILING

    if text in ("off", "auto"):
        return None if text == "off" else "auto"
    parts = [int(p) for p in text.split(":")]
    if len(parts) not in (2, 3):
        raise ValueError(f"tiling {text!r} must be off, auto or TILE:OVERLAP[:PASSES]")
    passes = {"stat_passes": parts[2]} if len(parts) == 3 else {}
    return dataclasses.replace(AUTO_TILING, min_side=parts[0], tile=parts[0], overlap=parts[1], **passes)


def applies(tiling: str, size: int) -> bool:
    """Whether ``tiling`` tiles a ``size`` x ``size`` image (``off`` always runs: it is the reference)."""
    from ldm.refine.first_stage import AUTO_TILING

    config = AUTO_TILING if tiling == "auto" else parse_tiling(tiling)
    return config is None or config.applies_to(size, size)


class StubTextEncoder(torch.nn.Module):
    """Stands in for ``FrozenCLIPEmbedder`` where ``transformers`` is missing: texts ``[n]`` -> ``[n, length, width]``
    float32 on the module's device, a fixed pseudo-random embedding per text (seeded by its CRC-32), no parameters.
    Keeps the expert text-conditioned (``encode`` is what ``LatentDiffusion.get_learned_conditioning`` calls) at
    CLIP's output shape."""

    def __init__(self, width: int, length: int = 77) -> None:
        super().__init__()
        self.width, self.length = width, length
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # follows .to(device): where to put outputs

    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = [
            torch.randn(self.length, self.width, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts
        ]
        return torch.stack(rows).to(self.anchor.device)


def write_clip_folder(folder: Path, text_config: dict[str, Any]) -> Path:
    """A config-only CLIP folder that ``FrozenCLIPEmbedder`` reads offline: a letters-only BPE tokenizer (saved by
    ``CLIPTokenizer``) and ``CLIPTextConfig(**text_config)`` (no weights file: the text model gets random weights)."""
    import string

    import transformers

    raw = folder / "raw"
    raw.mkdir(parents=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + [c + end for end in ("", "</w>") for c in string.ascii_lowercase]
    (raw / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (raw / "merges.txt").write_text("#version: 0.2\n")  # no merges: every letter is a token
    transformers.CLIPTokenizer.from_pretrained(str(raw), local_files_only=True).save_pretrained(str(folder))
    transformers.CLIPTextConfig(**text_config).save_pretrained(str(folder))
    return folder


def build_sd_v1(unet: str, text_encoder: str, folder: Path, seed: int = 0) -> Any:
    """An SD v1 ``LatentDiffusion`` from ``configs/stable-diffusion/v1-inference.yaml`` with random weights, in eval mode
    (``unet``: ``sd-v1`` full size, ``sd-v1-tiny`` test size; ``text_encoder``: ``clip`` or ``stub``, see the module
    docstring); a CLIP folder is written under ``folder``.  Zero-initialised UNet output layers get small random weights
    (as in :func:`common.build_model`) so the network's output is not identically zero."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.to_container(OmegaConf.load(SD_V1_CONFIG), resolve=True)["model"]
    cfg.pop("base_learning_rate", None)
    params = cfg["params"]
    params.pop("ckpt_path", None)
    if unet == "sd-v1-tiny":
        params["unet_config"]["params"].update(TINY_SD_UNET)
        params["first_stage_config"]["params"]["ddconfig"].update(TINY_SD_VAE)
        params["image_size"] = 8
    width = params["unet_config"]["params"]["context_dim"]
    if text_encoder == "clip":
        text_config = CLIP_L_TEXT if unet == "sd-v1" else TINY_CLIP_TEXT
        if text_config["hidden_size"] != width:
            raise ValueError(f"the CLIP width {text_config['hidden_size']} is not the UNet's context_dim {width}")
        params["cond_stage_config"]["params"]["version"] = str(write_clip_folder(folder / "clip", text_config))
    else:
        params["cond_stage_config"] = {"target": "torch.nn.Identity"}  # replaced by the stub below
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    if text_encoder == "stub":
        model.cond_stage_model = StubTextEncoder(width)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if name.endswith("weight") and param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration (runs in a child process); saves the refined image to ``cfg["output"]``."""
    import resource

    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm.imageio.prompt import Prompt
    from ldm.refine import Refiner

    if torch.device(cfg["device"]).type == "cpu":  # (a CUDA context reserves far more address space than it uses)
        limit = int(cfg["max_memory_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    set_threads(cfg["threads"])
    sd = cfg["unet"] in SD_UNETS
    with tempfile.TemporaryDirectory() as tmp:
        experts = ([build_sd_v1(cfg["unet"], cfg["text_encoder"], Path(tmp))] if sd
                   else build_experts(cfg["unet"], first_stage="real"))  # fmt: skip
    invariant = {"auto": None, "on": True, "off": False}[cfg["batch_invariant"]]
    refiner = Refiner(
        experts, device=cfg["device"], precision=cfg["precision"], tiling=parse_tiling(cfg["tiling"]), batch_invariant=invariant
    )
    unet_batches: list[int] = []  # the batch of every UNet call: 2 with guidance unless batch-invariant (1 + 1)
    for expert in refiner.experts:
        expert.model.model.diffusion_model.register_forward_pre_hook(
            lambda _module, args: unet_batches.append(int(args[0].shape[0]))
        )
    if sd:
        steps = {"start_t": SD_START_T, "tail_steps": SD_TAIL_STEPS}
        prompt = Prompt(SD_PROMPT, guidance_scale=cfg["guidance"])
    else:
        steps, prompt = {"start_t": START_T, "ddim_steps": DDIM_STEPS}, None
    n_steps = len(refiner.plan(**steps).timesteps)
    x = photo_batch(1, cfg["size"]).to(refiner.device)
    model_mib = current_rss_mib()
    timings: dict[str, float] = {}
    step_ends: list[float] = []

    def step_done(_index: int) -> None:
        sync(refiner.device)
        step_ends.append(time.perf_counter())

    start = time.perf_counter()
    # "math": the state before the attention fix (strided q, k, v made SDPA fall back to its math kernel)
    with sdpa_kernel([SDPBackend.MATH]) if cfg["attention"] == "math" else contextlib.nullcontext():
        out = refiner.refine_tensors(x, seeds=0, timings=timings, prompt=prompt, callback=step_done, **steps)
    wall = time.perf_counter() - start
    peak = peak_rss_mib()
    np.save(cfg["output"], out.cpu().numpy())
    result = {
        "model_mib": round(model_mib),
        "peak_mib": round(peak),
        "refine_mib": round(peak - model_mib),
        "peak_gib": round(peak / 1024, 2),
        "wall_s": wall,
        "encode_s": timings["encode"],
        "sample_s": timings["sample"],
        "steps": n_steps,
        "unet_calls": len(unet_batches),
        "unet_batch": max(unet_batches),
        "s_step": timings["sample"] / n_steps,
        "last_step_s": step_ends[-1] - step_ends[-2] if len(step_ends) >= 2 else None,
        "decode_s": timings["decode"],
        "refiner": refiner.describe(),
    }
    if refiner.device.type == "cuda":
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(refiner.device) / 2**20)
        result["cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved(refiner.device) / 2**20)
    return result


SAME_CASE = ("size", "unet", "text_encoder", "precision", "guidance", "batch_invariant")


def compare(rows: list[dict[str, Any]], outputs: dict[int, Path]) -> None:
    """Add the difference of every output to the untiled flash-attention output of the same case (where it exists)."""
    import numpy as np

    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if all(r[k] == row[k] for k in SAME_CASE)
                and r["tiling"] == "off"
                and r["attention"] == "flash"
                and "error" not in r
            ),
            None,
        )
        if ref is None or row is ref or "error" in row:
            continue
        a, b = np.load(outputs[id(row)]), np.load(outputs[id(ref)])
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        mse = float((diff**2).mean())
        row["max_err"] = float(diff.max())
        row["mean_err"] = float(diff.mean())
        row["psnr_db"] = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf  # peak-to-peak range 2 in [-1, 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="image sides in px")
    p.add_argument(
        "--tilings", nargs="+", default=["off", "auto", "512:128", "256:64"], help="off, auto or TILE:OVERLAP[:PASSES]"
    )
    p.add_argument(
        "--attention",
        nargs="+",
        choices=("flash", "math"),
        default=["flash"],
        help="math: force the N x N math kernel, as before the attention fix (see above)",
    )
    p.add_argument(
        "--max-memory-gib", type=float, default=None, help="address-space cap of each child (default 16; 20 for --unet sd-v1)"
    )
    p.add_argument(
        "--unet",
        choices=("real", "tiny", *SD_UNETS),
        default="real",
        help="real/tiny: the two late-steps experts; sd-v1: one SD-v1-sized expert with a prompt (see above)",
    )
    p.add_argument(
        "--text-encoder",
        choices=("clip", "stub"),
        default="clip",
        help="sd-v1 only: CLIP ViT-L/14's text model (random weights) or a parameter-free stand-in",
    )
    p.add_argument(
        "--guidance",
        nargs="+",
        type=float,
        default=[7.5],
        help="sd-v1 only: guidance scales (7.5: both branches in one batch of 2; 1: conditional only)",
    )
    p.add_argument(
        "--batch-invariant",
        nargs="+",
        choices=("auto", "on", "off"),
        default=["auto"],
        help="the Refiner's batch_invariant (auto: on for CPU, where guidance's two branches then run as two "
        "batch-1 UNet calls; off: one batch-2 call, as on CUDA)",
    )
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32"])
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (peak RSS is host memory; CUDA peak reported too)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    args = p.parse_args(argv)
    for text in args.tilings:
        parse_tiling(text)
    sd = args.unet in SD_UNETS
    if args.max_memory_gib is None:
        args.max_memory_gib = 20.0 if args.unet == "sd-v1" else 16.0
    if sd and args.text_encoder == "clip":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            p.error(
                "--text-encoder clip needs transformers (pip install transformers, the 'text' extra); "
                "or pass --text-encoder stub"
            )
    set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    outputs: dict[int, Path] = {}
    guidances = args.guidance if sd else [None]
    with tempfile.TemporaryDirectory() as tmp:
        for size, attention, tiling, precision, guidance, invariant in itertools.product(
            args.sizes, args.attention, args.tilings, args.precision, guidances, args.batch_invariant
        ):
            if not applies(tiling, size):
                continue
            name = f"{size}-{attention}-{tiling.replace(':', '_')}-{precision}-{guidance}-{invariant}.npy"
            cfg = dict(
                size=size,
                tiling=tiling,
                attention=attention,
                unet=args.unet,
                text_encoder=args.text_encoder if sd else None,
                precision=precision,
                guidance=guidance,
                batch_invariant=invariant,
                threads=args.threads,
                device=args.device,
                output=str(Path(tmp) / name),
                max_memory_gib=args.max_memory_gib,
            )
            print(f"running {cfg}", flush=True)
            row = {**cfg, **run_child(Path(__file__), cfg, timeout=args.timeout)}
            if "refiner" in row:
                row["batching"] = "per-sample" if "batch-invariant" in row["refiner"] else "batched"
            outputs[id(row)] = Path(row.pop("output"))
            rows.append(row)
        compare(rows, outputs)
    what = (
        f"encode (+ prompt) -> {SD_TAIL_STEPS} steps from t={SD_START_T} -> decode, SD v1 ({args.unet}, "
        f"{args.text_encoder} text encoder)"
        if sd
        else "encode -> 2 tail steps -> decode"
    )
    columns = COLUMNS + ["cuda_peak_mib", "cuda_reserved_mib"] * args.device.startswith("cuda")
    return report("bench_memory", rows, columns, f"{what} on {args.device}, {args.threads} threads", args)


if __name__ == "__main__":
    run_script(measure, main)
