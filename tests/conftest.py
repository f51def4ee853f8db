"""Shared fixtures: tiny model configs, real photo crops, tiny checkpoints.  Build each once; reuse everywhere."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

# Property tests draw the same examples on every run (a CI run cannot go red by chance); HYPOTHESIS_PROFILE=explore
# draws new ones, e.g. `HYPOTHESIS_PROFILE=explore pytest tests/test_train_cli.py` to hunt for more failures.
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# Tiny models: 2 threads at most (the CI machine's cores), shared by pytest-xdist's workers (`-n 2`: one each);
# OMP_NUM_THREADS=1 runs the suite on one core beside other work.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS") or 2)) // _WORKERS))

# Files that run for minutes (end-to-end training through subprocesses) start first, so that the many short files fill
# both workers up to the end instead of one long file running alone after the rest (pytest-xdist's loadfile hands out
# files in collection order once its own reordering, by number of tests, is turned off).  Longest first.
LONG_FILES = (
    "test_benchmarks.py",
    "test_quickstart.py",
    "test_main.py",
    "test_training_extras.py",
    "test_readme_run.py",
    "test_checkpoint_io.py",
    "test_latent_cache.py",
    "test_shard_stream.py",
    "test_refine_distributed.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


# ---------------------------------------------------------------------------------------------------------------------
# tiny configs (CPU-sized; shapes follow the real f4 layout: 3 latent channels, downsampling 4)

TINY_DDCONFIG = {
    "double_z": False,
    "z_channels": 3,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}

TINY_UNET_PARAMS = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
}


def tiny_first_stage_config(n_embed: int = 64) -> dict:
    """VQModelInterface config for LatentDiffusion: f4, embed_dim 3, small codebook."""
    return {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {
            "embed_dim": 3,
            "n_embed": n_embed,
            "ddconfig": copy.deepcopy(TINY_DDCONFIG),
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def tiny_ldm_params(**overrides) -> dict:
    """Params of a tiny unconditional LatentDiffusion (latent 8x8 from 32x32 images)."""
    params = {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "timesteps": 1000,
        "first_stage_key": "image",
        "image_size": 8,
        "channels": 3,
        "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(TINY_UNET_PARAMS)},
        "first_stage_config": tiny_first_stage_config(),
        "cond_stage_config": "__is_unconditional__",
    }
    params.update(overrides)
    return params


def tiny_ldm_model() -> torch.nn.Module:
    """A tiny LatentDiffusion (:func:`tiny_ldm_params`, seed 0) whose output layer is not zero, in eval mode."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    m = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    torch.nn.init.normal_(m.model.diffusion_model.out[2].weight, std=0.05)
    return m.eval()


def reference_ddim_eq12(x, eps, a_t, a_prev, eta, z):
    """DDIM eq. 12 in float64 with sigma from eq. 16: ``(x_prev, pred_x0)``."""
    x, eps, z = x.double(), eps.double(), z.double()
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    pred_x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z, pred_x0


@pytest.fixture
def tiny_ddconfig() -> dict:
    return copy.deepcopy(TINY_DDCONFIG)


@pytest.fixture
def tiny_unet_params() -> dict:
    return copy.deepcopy(TINY_UNET_PARAMS)


# ---------------------------------------------------------------------------------------------------------------------
# real photographs shipped with scikit-image (no download)


def load_photos() -> list[np.ndarray]:
    """RGB uint8 photographs ``[H, W, 3]`` from scikit-image's bundled data."""
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea()]


def photo_crops(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` random ``size``x``size`` crops of the bundled photos as ``[n, 3, size, size]`` float in [-1, 1]."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        # downscale by 4 first so that a small crop still holds structure, not a flat patch
        img = img[::4, ::4]
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        crops.append(img[y : y + size, x : x + size])
    arr = np.stack(crops).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    return load_photos()


@pytest.fixture
def crops32() -> torch.Tensor:
    return photo_crops(8, 32)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="ldm")
    yield


# ---------------------------------------------------------------------------------------------------------------------
# tiny late-steps experts saved as main.py saves them: {"state_dict", "config" (the merged project config), "window"}

LATESTEPS_TARGET = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"


def tiny_expert_config(t_min: int, t_max: int, **overrides) -> dict:
    """Project config (as embedded in checkpoints by main.py) of a tiny late-steps expert on ``[t_min, t_max)``."""
    return {"model": {"target": LATESTEPS_TARGET, "params": tiny_ldm_params(t_min=t_min, t_max=t_max, **overrides)}}


def build_tiny_expert(t_min: int, t_max: int, seed: int = 0, first_stage_state: dict | None = None):
    """A tiny LateStepsLatentDiffusion with live (non-zero) output layers; optionally sharing a first stage."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_expert_config(t_min, t_max)["model"])
    torch.nn.init.normal_(model.model.diffusion_model.out[2].weight, std=0.02)
    model.model_ema = type(model.model_ema)(model.model)
    if first_stage_state is not None:
        model.first_stage_model.load_state_dict(first_stage_state)
    return model.eval()


def save_expert_checkpoint(model, path, global_step: int = 0) -> None:
    """Write ``model`` in main.py's checkpoint layout."""
    from ldm.checkpoint import save_checkpoint

    t_min, t_max = model.window()
    cfg = tiny_expert_config(t_min, t_max)
    save_checkpoint(
        {"state_dict": model.state_dict(), "config": cfg, "window": [t_min, t_max], "global_step": global_step}, path
    )


@pytest.fixture(scope="session")
def expert_checkpoints(tmp_path_factory):
    """Two tiny experts sharing one first stage: t in [250, 500) (steps 500-750) and [0, 250) (steps 750-1000)."""
    root = tmp_path_factory.mktemp("experts")
    shapes = build_tiny_expert(250, 500, seed=0)
    details = build_tiny_expert(0, 250, seed=1, first_stage_state=shapes.first_stage_model.state_dict())
    paths = [root / "latesteps_500_750.ckpt", root / "latesteps_750_1000.ckpt"]
    save_expert_checkpoint(shapes, paths[0])
    save_expert_checkpoint(details, paths[1])
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# small image folders and tar shards (cached latents, shard streams)


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of random pixels (every crop is unique, so crops and flips can be told apart)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root, n: int, size: int = 32) -> list:
    """``n`` PNGs of varied shapes (short side ``size`` to ``size + 8``) in ``root`` and a sub-folder."""
    from pathlib import Path

    paths = []
    for i in range(n):
        path = Path(root) / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        width, height = (size + 4 * (i % 5), size + i % 3) if i % 2 else (size + i % 4, size + 3 * (i % 4))
        path.write_bytes(noise_png(width, height, seed=i))
        paths.append(path)
    return paths


def write_image_shards(root, counts: list[int], size: int = 32, prefix: str = "img") -> str:
    """Tar shards ``<prefix>-00.tar ...`` holding ``counts[s]`` PNG samples each (key ``s<shard>-<i>``, plus a ``.cls``
    member with the sample's global number); returns the brace pattern."""
    from pathlib import Path

    from ldm.data.tar_shards import write_tar

    number = 0
    for shard, count in enumerate(counts):
        members = []
        for i in range(count):
            key = f"s{shard}-{i:03d}"
            members.append((f"{key}.png", noise_png(size + number % 5, size + 2, seed=1000 + number)))
            members.append((f"{key}.cls", str(number).encode()))
            number += 1
        with open(Path(root) / f"{prefix}-{shard:02d}.tar", "wb") as fh:
            write_tar(fh, members)
    return str(Path(root) / f"{prefix}-{{00..{len(counts) - 1:02d}}}.tar")


# ---------------------------------------------------------------------------------------------------------------------
# detecting device-to-host reads (the sampling loop and the EMA update must do none)


class HostReads(TorchDispatchMode):
    """Records the ops that copy device values to the host: ``.item()``, ``int/float(t)``, ``bool(t)``, ``torch.equal``
    (dispatched ops) and ``.tolist()`` / ``.numpy()`` (which bypass dispatch: patched while the mode is on)."""

    READS = {"item", "_local_scalar_dense", "is_nonzero", "equal"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads: list[str] = []
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def recorded(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, recorded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------------
# the web app (tests/test_app_*.py; helpers in tests/app_support.py): test images, the tiny experts' Refiner, a server


@pytest.fixture(scope="session")
def app_images() -> dict[str, tuple[bytes, bytes]]:
    """``{"rgb": (PNG, mask PNG), "rgba": (...)}``: an RGB photo crop (48x40), an RGBA one (53x37) and their masks
    (white rectangles, and a grey one: a proportional start)."""
    from app_support import png_bytes

    astro, coffee, _ = load_photos()
    rgb = astro[::10, ::10][:40, :48]
    rgba = np.dstack([coffee[::10, ::10][:37, :53], (np.arange(37 * 53).reshape(37, 53) % 251).astype(np.uint8)])
    mask_rgb = np.zeros((40, 48), dtype=np.uint8)
    mask_rgb[8:26, 10:30] = 255
    mask_rgb[30:36, 36:44] = 128  # grey: a proportional start
    mask_rgba = np.zeros((37, 53), dtype=np.uint8)
    mask_rgba[5:20, 30:50] = 255
    return {"rgb": (png_bytes(rgb), png_bytes(mask_rgb)), "rgba": (png_bytes(rgba), png_bytes(mask_rgba))}


@pytest.fixture(scope="session")
def app_refiner(expert_checkpoints):
    """A :class:`ldm.refine.Refiner` of the two tiny experts on the CPU (what the app's handlers run)."""
    from ldm.refine import Refiner

    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="session")
def app_server(expert_checkpoints, tmp_path_factory):
    """scripts/app.py -v serving the two tiny experts on a free port of 127.0.0.1 (network outside localhost refused),
    shared by the HTTP and browser tests; stopped at the end of the session."""
    pytest.importorskip("starlette", reason="the web app needs the app extra: pip install -e .[app]")
    pytest.importorskip("uvicorn", reason="the web app needs the app extra: pip install -e .[app]")
    from app_support import start_server

    with start_server(expert_checkpoints, tmp_path_factory.mktemp("app"), "-v") as running:
        yield running
