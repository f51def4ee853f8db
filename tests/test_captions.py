"""Captions in the data pipeline (folders, shards, latent caches) and caption dropout (``ucg_training``) for
classifier-free-guidance training with ``cond_stage_key: caption``."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.checkpoint import load_checkpoint
from ldm.data.cached_latents import CachedLatents
from ldm.data.captions import (
    CAPTION_KEY,
    MAX_CAPTION_BYTES,
    CaptionError,
    decode_caption,
    read_caption_file,
    sample_caption,
)
from ldm.data.image_folder import ImageFolderDataset
from ldm.data.latent_format import read_index
from ldm.data.shard_stream import ImageShards, LatentShards
from ldm.data.tar_shards import SAMPLE_ERROR_KEY, iter_samples, write_tar
from ldm.models.diffusion.latent import check_ucg_training, drop_captions
from ldm.util import ConfigError, instantiate_from_config

from conftest import TINY_UNET_PARAMS, noise_png, tiny_ldm_params
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONTEXT_DIM = 8


class HashTextEncoder(nn.Module):
    """Stand-in text encoder (the real ones live in ldm.modules.encoders): the UTF-8 bytes of each caption, cut or
    padded to ``max_length``, through a frozen random embedding -> ``[B, max_length, context_dim]``.  Every batch it
    encodes is recorded in ``HashTextEncoder.seen``."""

    seen: list[list[str]] = []

    def __init__(self, context_dim: int = CONTEXT_DIM, max_length: int = 6) -> None:
        super().__init__()
        self.max_length = max_length
        self.embedding = nn.Embedding(257, context_dim)  # 256 byte values + padding

    def encode(self, text: list[str]) -> torch.Tensor:
        assert isinstance(text, list) and all(isinstance(t, str) for t in text), text
        HashTextEncoder.seen.append(list(text))
        ids = torch.full((len(text), self.max_length), 256, dtype=torch.long)
        for i, caption in enumerate(text):
            data = caption.encode("utf-8")[: self.max_length]
            ids[i, : len(data)] = torch.tensor(list(data), dtype=torch.long)
        return self.embedding(ids.to(self.embedding.weight.device))

    def forward(self, text: list[str]) -> torch.Tensor:
        return self.encode(text)


ENCODER_CONFIG = {"target": "test_captions.HashTextEncoder", "params": {"context_dim": CONTEXT_DIM}}


def conditional_params(**overrides) -> dict:
    """A tiny text-conditioned LatentDiffusion: crossattn UNet (spatial transformer, context 8) + the stand-in."""
    unet = dict(TINY_UNET_PARAMS, use_spatial_transformer=True, context_dim=CONTEXT_DIM)
    params = tiny_ldm_params(
        cond_stage_key="caption",
        conditioning_key="crossattn",
        cond_stage_config=ENCODER_CONFIG,
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
    )
    params.update(overrides)
    return params


def build_conditional(**overrides):
    torch.manual_seed(0)
    return instantiate_from_config(
        {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": conditional_params(**overrides)}
    )


def captioned_folder(root: Path, captions: dict[str, bytes | None], size: int = 32) -> Path:
    """PNGs ``<name>.png`` in ``root``, each with the sidecar ``<name>.txt`` holding ``captions[name]`` (None: none)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        (root / f"{name}.png").write_bytes(noise_png(size + i % 3, size, seed=i))
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)
    return root


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> str:
    members = [(f"{key}.{ext}", data) for key, exts in samples.items() for ext, data in exts.items()]
    with open(path, "wb") as fh:
        write_tar(fh, members)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# decoding and bounds


def test_decode_caption_strips_bom_and_whitespace_and_bounds_bytes_before_decoding():
    assert decode_caption("\ufeffa red fox\n".encode(), "x") == "a red fox"
    assert decode_caption("über Straße".encode(), "x") == "über Straße"
    assert decode_caption(b"a" * MAX_CAPTION_BYTES, "x") == "a" * MAX_CAPTION_BYTES
    with pytest.raises(CaptionError, match="longer than"):
        decode_caption(b"a" * (MAX_CAPTION_BYTES + 1), "x")
    with pytest.raises(CaptionError, match="not UTF-8"):
        decode_caption(b"caf\xe9", "x")
    # invalid bytes past the limit are never decoded: the length is checked first
    with pytest.raises(CaptionError, match="longer than"):
        decode_caption(b"\xff" * (MAX_CAPTION_BYTES + 1), "x")


def test_read_caption_file_missing_folder_and_oversized(tmp_path):
    assert read_caption_file(tmp_path / "none.txt") is None
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(CaptionError, match="not a regular file"):
        read_caption_file(tmp_path / "dir.txt")
    (tmp_path / "big.txt").write_bytes(b"a" * (MAX_CAPTION_BYTES + 1))
    with pytest.raises(CaptionError, match=f"{MAX_CAPTION_BYTES + 1:,} bytes"):
        read_caption_file(tmp_path / "big.txt")


def test_sample_caption_prefers_txt_then_json_caption():
    assert sample_caption({"txt": b"from txt", "json": b'{"caption": "from json"}'}, "s") == "from txt"
    assert sample_caption({"json": b'{"caption": "from json", "width": 3}'}, "s") == "from json"
    assert sample_caption({"json": b'{"width": 3}'}, "s") is None
    assert sample_caption({"png": b""}, "s") is None
    for bad, message in (
        (b'{"caption": 3}', "not a string"),
        (b"[1]", "not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"caption": "\\ud800"}', "not UTF-8"),
    ):
        with pytest.raises(CaptionError, match=message):
            sample_caption({"json": bad}, "s")


# ---------------------------------------------------------------------------------------------------------------------
# image folders


def test_folder_sidecars_present_optional_and_off(tmp_path):
    root = captioned_folder(tmp_path / "f", {"a": b"a cat\n", "b": "\ufeffein Hund".encode(), "c": None})
    ds = ImageFolderDataset(root, size=32, split="all", val_fraction=0.0, captions="optional")
    items = {Path(ds[i]["file_path_"]).stem: ds[i] for i in range(len(ds))}
    assert {k: v[CAPTION_KEY] for k, v in items.items()} == {"a": "a cat", "b": "ein Hund", "c": ""}
    off = ImageFolderDataset(root, size=32, split="all", val_fraction=0.0)
    assert CAPTION_KEY not in off[0]
    batch = next(iter(DataLoader(ds, batch_size=3, shuffle=False)))
    assert batch[CAPTION_KEY] == ["a cat", "ein Hund", ""] and batch["image"].shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="captions="):
        ImageFolderDataset(root, size=32, split="all", val_fraction=0.0, captions="yes")


def test_required_captions_name_the_first_missing_file_in_one_line(tmp_path):
    root = captioned_folder(tmp_path / "f", {"a": b"x", "b": None, "c": None})
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(root, size=32, split="all", val_fraction=0.0, captions="required")
    message = str(info.value)
    assert "\n" not in message and "2 of the 3" in message and "b.png" in message and "'b.txt'" in message
    assert "captions: optional" in message


@pytest.mark.parametrize("bad", [b"caf\xe9 au lait", b"a" * (MAX_CAPTION_BYTES + 1)], ids=["non-utf8", "too-long"])
def test_a_bad_caption_file_skips_its_image_like_a_bad_image(tmp_path, caplog, bad):
    root = captioned_folder(tmp_path / "f", {"a": b"first", "b": bad, "c": b"third"})
    ds = ImageFolderDataset(root, size=32, split="all", val_fraction=0.0, captions="required")
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        captions = [ds[i][CAPTION_KEY] for i in range(3)] + [ds[1][CAPTION_KEY]]
    assert captions == ["first", "third", "third", "third"]  # b's place is taken by the next readable file
    assert ds.num_skipped == 1 and ds.skipped_files == [str(root / "b.png")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b.png" in warnings[0] and "CaptionError" in warnings[0]


# ---------------------------------------------------------------------------------------------------------------------
# tar shards


def shard_batches(dataset, batch_size: int) -> list[dict]:
    dataset.configure(batch_size=batch_size, rank=0, world_size=1, shuffle=False, drop_last=False)
    return list(dataset)


def test_image_shards_read_txt_and_json_captions(tmp_path):
    url = write_shard(
        tmp_path / "s.tar",
        {
            "k0": {"png": noise_png(32, 32, 0), "txt": b"a txt caption\n"},
            "k1": {"png": noise_png(32, 33, 1), "json": json.dumps({"caption": "a json caption", "w": 32}).encode()},
            "k2": {"png": noise_png(33, 32, 2), "json": b'{"w": 33}'},
            "k3": {"png": noise_png(32, 32, 3), "txt": b"txt wins", "json": b'{"caption": "json loses"}'},
        },
    )
    (batch,) = shard_batches(ImageShards(url, size=32, captions="optional"), 4)
    assert batch[CAPTION_KEY] == ["a txt caption", "a json caption", "", "txt wins"]
    assert batch["image"].shape == (4, 32, 32, 3)
    (plain,) = shard_batches(ImageShards(url, size=32), 4)
    assert CAPTION_KEY not in plain
    required = ImageShards(url, size=32, captions="required")
    (batch,) = shard_batches(required, 4)
    assert "" not in batch[CAPTION_KEY] and required.num_skipped == 1  # k2 has no caption: skipped, replaced


def test_shard_caption_members_are_bounded_from_the_header_and_bad_ones_skip_their_sample(tmp_path):
    url = write_shard(
        tmp_path / "s.tar",
        {
            "k0": {"png": noise_png(32, 32, 0), "txt": b"good"},
            "k1": {"png": noise_png(32, 32, 1), "txt": b"a" * (MAX_CAPTION_BYTES + 1)},
            "k2": {"png": noise_png(32, 32, 2), "txt": b"caf\xe9"},
        },
    )
    samples = list(iter_samples(url, exts=("png", "txt"), member_limits={"txt": MAX_CAPTION_BYTES}))
    assert "txt" not in samples[1] and f"{MAX_CAPTION_BYTES:,} a .txt member" in samples[1][SAMPLE_ERROR_KEY]
    assert SAMPLE_ERROR_KEY not in samples[0] and SAMPLE_ERROR_KEY not in samples[2]
    dataset = ImageShards(url, size=32, captions="optional")
    (batch,) = shard_batches(dataset, 3)
    assert batch[CAPTION_KEY] == ["good", "good", "good"] and dataset.num_skipped == 2


# ---------------------------------------------------------------------------------------------------------------------
# latent caches


def _load_cache_cli():
    spec = importlib.util.spec_from_file_location("cache_latents_cli_captions", REPO / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cache_config(path: Path) -> Path:
    params = conditional_params()
    params["first_stage_config"]["params"]["ckpt_path"] = None
    cfg = {
        "model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params},
        "data": {
            "target": "ldm.data.datamodule.DataModuleFromConfig",
            "params": {"train": {"target": "ldm.data.image_folder.ImageFolderDataset", "params": {"size": 32}}},
        },
    }
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """Latent caches of a captioned folder (one image without a caption, one with a non-UTF-8 caption), of shards with
    .txt / .json captions, and of a folder without captions."""
    root = tmp_path_factory.mktemp("caption_cache")
    cli = _load_cache_cli()
    config = write_cache_config(root / "config.yaml")
    folder = captioned_folder(root / "images", {"a": b"alpha", "b": b"beta\n", "c": None, "d": b"\xff\xfe bad"})
    plain = captioned_folder(root / "plain", {"a": None, "b": None})
    (root / "shards").mkdir()
    shard = write_shard(
        root / "shards" / "in-00.tar",
        {
            "x": {"png": noise_png(32, 32, 5), "txt": b"from txt"},
            "y": {"png": noise_png(32, 32, 6), "json": b'{"caption": "from json"}'},
            "z": {"png": noise_png(32, 32, 7)},
        },
    )
    common = ["--config", str(config), "--shard-size", "2", "--batch-size", "2", "--size", "32"]
    assert cli.main([*common, "--data", str(folder), "--out", str(root / "c_folder"), "--split", "all"]) == 1  # 1 skipped
    assert cli.main([*common, "--data", str(plain), "--out", str(root / "c_plain"), "--split", "all"]) == 0
    assert cli.main([*common, "--data", shard, "--out", str(root / "c_shards")]) == 0
    return {"folder": root / "c_folder", "plain": root / "c_plain", "shards": root / "c_shards"}


def test_cached_latents_round_trip_the_caption(caches):
    index = read_index(caches["folder"])
    assert index.captions == 2 and index.skipped == 1  # a and b; c has none; d's caption is not UTF-8 (skipped)
    ds = CachedLatents(caches["folder"])
    assert ds.captions == "optional"
    assert {ds[i]["file_path_"]: ds[i][CAPTION_KEY] for i in range(len(ds))} == {"a.png": "alpha", "b.png": "beta", "c.png": ""}
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch[CAPTION_KEY] == ["alpha", "beta", ""] and batch["cached_latent"].shape[0] == 3
    assert CAPTION_KEY not in CachedLatents(caches["folder"], captions="off")[0]
    with pytest.raises(ConfigError, match="1 of the 3 samples .* no caption \\(first: 'c.png'\\)"):
        CachedLatents(caches["folder"], captions="required")
    streamed = LatentShards(str(caches["folder"]), shuffle_buffer=4)
    (batch,) = shard_batches(streamed, 3)
    assert batch[CAPTION_KEY] == ["alpha", "beta", ""]


def test_cache_of_shards_keeps_txt_and_json_captions(caches):
    ds = CachedLatents(caches["shards"])
    assert [ds[i][CAPTION_KEY] for i in range(len(ds))] == ["from txt", "from json", ""]
    pattern = str(caches["shards"] / "latents-000000.tar")  # no index: auto is off, optional reads the .txt members
    assert CAPTION_KEY not in shard_batches(LatentShards(pattern, shuffle_buffer=4), 3)[0]
    (batch,) = shard_batches(LatentShards(pattern, shuffle_buffer=4, captions="optional"), 3)
    assert batch[CAPTION_KEY] == ["from txt", "from json", ""]


def test_cache_without_captions_is_unchanged(caches):
    assert "captions" not in json.loads((caches["plain"] / "index.json").read_text())
    assert read_index(caches["plain"]).captions == 0
    sidecar = json.loads((caches["plain"] / "latents-000000.json").read_text())
    assert all(set(e) == {"key", "source", "offset", "size"} for e in sidecar["samples"])
    assert CAPTION_KEY not in CachedLatents(caches["plain"])[0]
    assert CachedLatents(caches["plain"], captions="optional")[0][CAPTION_KEY] == ""


# ---------------------------------------------------------------------------------------------------------------------
# caption dropout


def test_dropout_p0_never_p1_always_and_p_half_reproducible_near_half():
    captions = [f"caption {i}" for i in range(4000)]
    gen = torch.Generator().manual_seed(0)
    assert drop_captions(captions, 0.0, "", gen) == captions
    assert drop_captions(captions, 1.0, "<none>", gen) == ["<none>"] * 4000
    first = drop_captions(captions, 0.5, "", torch.Generator().manual_seed(7))
    again = drop_captions(captions, 0.5, "", torch.Generator().manual_seed(7))
    other = drop_captions(captions, 0.5, "", torch.Generator().manual_seed(8))
    assert first == again and first != other
    dropped = sum(c == "" for c in first)
    # Binomial(4000, 0.5): sd 31.6; 6 sd is a false alarm once in 10^9 seeds (and the seed is fixed)
    assert abs(dropped - 2000) < 6 * 31.7
    assert all(c in ("", f"caption {i}") for i, c in enumerate(first))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"caption": {"p": 1.5}}, "probability"),
        ({"caption": {"p": True}}, "probability"),
        ({"caption": {"prob": 0.1}}, "must be a mapping with p"),
        ({"caption": {"p": 0.1, "value": ""}}, "no other keys"),
        ({"caption": {"p": 0.1, "val": 3}}, "must be a string"),
        ([0.1], "must be a mapping"),
    ],
)
def test_ucg_training_config_errors_say_the_format(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        check_ucg_training(bad)
    assert "ucg_training: {caption: {p: 0.1" in str(info.value)
    assert check_ucg_training({"caption": {"p": 0.1}}) == {"caption": {"p": 0.1, "val": ""}}
    assert check_ucg_training({"caption": {"p": 1, "val": None}}) == {"caption": {"p": 1.0, "val": ""}}
    with pytest.raises(ValueError, match="this one is unconditional"):
        instantiate_from_config(
            {
                "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                "params": tiny_ldm_params(ucg_training={"caption": {"p": 0.1}}),
            }
        )


def caption_batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"image": torch.rand(n, 32, 32, 3) * 2 - 1, CAPTION_KEY: [f"photo {i}" for i in range(n)]}


def test_get_input_hands_the_caption_list_to_the_text_encoder():
    model = build_conditional()
    HashTextEncoder.seen.clear()
    z, c = model.get_input(caption_batch(), "image")
    assert HashTextEncoder.seen == [["photo 0", "photo 1", "photo 2", "photo 3"]]
    assert z.shape == (4, 3, 8, 8) and c.shape == (4, 6, CONTEXT_DIM)
    _, c2, xc = model.get_input(caption_batch(), "image", return_original_cond=True, bs=2)
    assert xc == ["photo 0", "photo 1"] and c2.shape[0] == 2 and HashTextEncoder.seen[-1] == xc
    loss, _ = model(z, c)
    assert torch.isfinite(loss)
    with pytest.raises(KeyError, match="captions='required'"):
        model.get_input({"image": caption_batch()["image"]}, "image")
    with pytest.raises(TypeError, match="list of str"):
        model.get_input({**caption_batch(), CAPTION_KEY: "one string"}, "image")


def test_dropout_applies_in_training_steps_only_never_in_validation(monkeypatch):
    model = build_conditional(ucg_training={"caption": {"p": 1.0, "val": ""}})
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    batch = caption_batch()
    HashTextEncoder.seen.clear()
    model.train()
    model.training_step(batch, 0)
    assert HashTextEncoder.seen == [[""] * 4]
    assert batch[CAPTION_KEY] == [f"photo {i}" for i in range(4)]  # the loader's batch is not changed
    HashTextEncoder.seen.clear()
    model.eval()
    model.validation_step(batch, 0)
    assert HashTextEncoder.seen and all(seen == batch[CAPTION_KEY] for seen in HashTextEncoder.seen)
    assert model.apply_ucg(batch) is batch  # eval mode: nothing dropped
    model.train()
    half = build_conditional(ucg_training={"caption": {"p": 0.5}})
    big = {CAPTION_KEY: [f"c{i}" for i in range(64)]}
    first = half.apply_ucg(big, torch.Generator().manual_seed(3))[CAPTION_KEY]
    assert first == half.apply_ucg(big, torch.Generator().manual_seed(3))[CAPTION_KEY] and "" in first
    torch.manual_seed(11)  # no generator: torch's global one, which main.py reseeds before every step
    a = half.apply_ucg(big)[CAPTION_KEY]
    torch.manual_seed(11)
    assert half.apply_ucg(big)[CAPTION_KEY] == a
    with pytest.raises(KeyError, match="ucg_training drops batch\\['txt'\\]"):
        build_conditional(ucg_training={"txt": {"p": 0.5}}).apply_ucg(batch)


# ---------------------------------------------------------------------------------------------------------------------
# main.py: a tiny conditional expert trains on captioned images, with dropout recorded in its config


def test_main_trains_a_text_conditioned_expert_on_captioned_images(tmp_path):
    folder = captioned_folder(tmp_path / "images", {f"im{i}": f"photo number {i}".encode() for i in range(8)})
    params = conditional_params(
        t_min=0, t_max=500, monitor="val/loss_window_ema", scale_by_std=True, ucg_training={"caption": {"p": 0.5, "val": ""}}
    )
    dataset = {
        "target": "ldm.data.image_folder.ImageFolderDataset",
        "params": {"root": str(folder), "size": 32, "split": "all", "val_fraction": 0.0, "captions": "required"},
    }
    cfg = {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion",
            "params": params,
        },
        "data": {
            "target": "ldm.data.datamodule.DataModuleFromConfig",
            "params": {
                "batch_size": 4,
                "num_workers": 0,
                "train": dataset,
                "validation": {**dataset, "params": {**dataset["params"], "random_crop": False}},
            },
        },
        "lightning": {
            "trainer": {
                "accelerator": "cpu",
                "devices": 1,
                "max_steps": 3,
                "num_sanity_val_steps": 0,
                "val_check_interval": 2,
                "check_val_every_n_epoch": None,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "log_every_n_steps": 1,
            },
            "callbacks": {
                "image_logger": {
                    "target": "ldm.train.callbacks.ImageLogger",
                    "params": {
                        "batch_frequency": 2,
                        "max_images": 2,
                        "increase_log_steps": False,
                        "log_images_kwargs": {"ddim_steps": 4},
                    },
                }
            },
        },
    }
    config = tmp_path / "text.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    env.pop("LATESTEPS_LOGDIR", None)
    result = run_python([REPO / "main.py", "-b", config, "-t", "-l", tmp_path / "logs"], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir()]
    (project,) = run.glob("configs/*-project.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(project))
    assert saved["model"]["params"]["ucg_training"] == {"caption": {"p": 0.5, "val": ""}}
    assert saved["model"]["params"]["cond_stage_key"] == "caption"
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(".attn2.to_k." in key for key in state)  # the UNet's cross-attention was built and saved
    rows = [r for path in run.glob("csv/version_*/metrics.csv") for r in csv.DictReader(path.open())]
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 3 and all(map(lambda v: v == v and v < 10, losses))
    assert any(r.get("val/loss_window_ema") for r in rows)  # validation ran on captions too
