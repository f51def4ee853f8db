"""Cached latents: scripts/cache_latents.py (resume, torchrun, bad arguments), CachedLatents and training from the cache
(same losses as from the images; another first stage refused).  The format (ldm/data/latent_format.py) is tested in
test_latent_format.py, reading input tars (ldm/data/tar_shards.py) in test_tar_shards.py."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.data.cached_latents import CachedLatents
from ldm.data.image_folder import ImageFolderDataset
from ldm.data.latent_format import CACHED_LATENT_KEY, FirstStageMismatchError, first_stage_sha256, read_index
from ldm.util import ConfigError, instantiate_from_config

from conftest import write_image_folder
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cache_latents.py"
QUICKSTART = REPO / "configs" / "quickstart" / "latesteps_500_750.yaml"
TIMEOUT = 600


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cache_cli = load_module("cache_latents_cli", SCRIPT)


def first_stage_config(ckpt: Path | None) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART).model.params.first_stage_config)
    cfg["params"]["ckpt_path"] = None if ckpt is None else str(ckpt)
    return cfg


def make_first_stage_ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_checkpoint({"state_dict": instantiate_from_config(first_stage_config(None)).state_dict()}, path)
    return path


def project_config(path: Path, ckpt: Path, train: dict, max_steps: int = 4) -> Path:
    """The quickstart config with this first stage, ``train`` as the only split, a few steps, no image logging."""
    cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART))
    cfg["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = str(ckpt)
    cfg["data"]["params"] = {"batch_size": 4, "num_workers": 0, "train": train}
    cfg["lightning"]["trainer"].update(
        max_steps=max_steps, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1
    )
    cfg["lightning"]["callbacks"]["image_logger"]["params"]["disabled"] = True
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """8 images, a first-stage checkpoint, and their cache (centre crops + flips, shards of 3)."""
    root = tmp_path_factory.mktemp("cache")
    write_image_folder(root / "images", 8)
    ckpt = make_first_stage_ckpt(root / "vq.ckpt", seed=0)
    config = project_config(root / "config.yaml", ckpt, {})
    argv = [
        "--config",
        str(config),
        "--data",
        str(root / "images"),
        "--out",
        str(root / "cache"),
        "--split",
        "all",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
    ]
    assert cache_cli.main(argv) == 0
    return {"root": root, "images": root / "images", "out": root / "cache", "ckpt": ckpt, "config": config}


def first_stage(ckpt: Path):
    return instantiate_from_config(first_stage_config(ckpt)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# the cache and CachedLatents


def test_cached_latents_equal_the_encoded_image_dataset_items(cache):
    index = read_index(cache["out"])
    assert index.num_samples == 8 and [c for _, c in index.shards] == [3, 3, 2] and index.variants == 2
    model = first_stage(cache["ckpt"])
    assert index.first_stage_sha256 == first_stage_sha256(model)
    images = ImageFolderDataset(cache["images"], size=32, split="all", random_crop=False, seed=7)
    cached = CachedLatents(cache["out"], seed=7)
    for epoch in (0, 1):
        images.set_epoch(epoch)
        cached.set_epoch(epoch)
        x = torch.stack([torch.from_numpy(images[i]["image"]) for i in range(8)]).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            z = model.encode(x)
        items = [cached[i] for i in range(8)]
        torch.testing.assert_close(torch.stack([it[CACHED_LATENT_KEY] for it in items]), z, rtol=1e-5, atol=1e-5)
        assert [it["file_path_"] for it in items] == [
            Path(images[i]["file_path_"]).relative_to(cache["images"]).as_posix() for i in range(8)
        ]


def test_cached_latents_refuse_a_modified_cache_and_skip_a_corrupt_sample(cache, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache["out"], copy)
    sidecar = json.loads((copy / "latents-000001.json").read_text())
    entry = sidecar["samples"][1]
    with open(copy / "latents-000001.tar", "r+b") as fh:  # break the .npy magic of sample 4
        fh.seek(entry["offset"])
        fh.write(b"\0\0\0\0")
    dataset = CachedLatents(copy)
    item = dataset[4]
    assert dataset.num_skipped == 1 and item["file_path_"] == sidecar["samples"][2]["source"]
    assert "skipping unreadable cached latent" in caplog.text
    with open(copy / "latents-000002.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(ConfigError, match="does not match"):
        CachedLatents(copy)
    (copy / "index.json").unlink()
    with pytest.raises(ConfigError, match="was interrupted"):
        CachedLatents(copy)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """main.py in this process (one process, no DDP): exit code and stderr."""
    main_module = load_module("latesteps_main", REPO / "main.py")
    code = main_module.main(argv)
    return code, capsys.readouterr().err


def train_losses(run: Path) -> dict[int, float]:
    losses = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss_step"):
                losses[int(row["step"])] = float(row["train/loss_step"])
    return losses


def test_training_from_cached_latents_gives_the_losses_of_training_from_images(cache, tmp_path, capsys):
    """Same seed, same crops (centre + flip drawn per epoch), scale_by_std from the first batch: the same loss at every
    step, over two epochs; and a cache of another first stage is refused with one line naming both hashes."""
    images = {
        "target": "ldm.data.image_folder.ImageFolderDataset",
        "params": {"root": str(cache["images"]), "size": 32, "split": "all", "random_crop": False},
    }
    latents = {"target": "ldm.data.cached_latents.CachedLatents", "params": {"root": str(cache["out"])}}
    runs = {}
    for name, train in (("images", images), ("latents", latents)):
        config = project_config(tmp_path / f"{name}.yaml", cache["ckpt"], train)
        code, err = run_main(["-b", str(config), "-t", "-n", name, "-l", str(tmp_path / "logs"), "--no-test"], capsys)
        assert code == 0, err[-3000:]
        (runs[name],) = (tmp_path / "logs").glob(f"*_{name}")
    a, b = train_losses(runs["images"]), train_losses(runs["latents"])
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert b == pytest.approx(a, rel=1e-4)
    scale = [load_checkpoint(runs[n] / "checkpoints" / "last.ckpt")["state_dict"]["scale_factor"] for n in runs]
    assert scale[0] != 1.0 and float(scale[0]) == pytest.approx(float(scale[1]), rel=1e-5)

    other = make_first_stage_ckpt(tmp_path / "other_vq.ckpt", seed=1)
    config = project_config(tmp_path / "other.yaml", other, latents)
    code, err = run_main(["-b", str(config), "-t", "-n", "other", "-l", str(tmp_path / "logs")], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err[-3000:]
    theirs, ours = read_index(cache["out"]).first_stage_sha256, first_stage_sha256(first_stage(other))
    assert theirs in lines[0] and ours in lines[0] and "cache_latents.py" in lines[0]


def test_the_model_refuses_latents_of_another_first_stage_in_any_batch(cache):
    model_cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART).model)
    model_cfg.pop("base_learning_rate")
    model_cfg["params"]["first_stage_config"]["params"]["ckpt_path"] = None
    model = instantiate_from_config(model_cfg)
    batch = torch.utils.data.default_collate([CachedLatents(cache["out"])[i] for i in range(2)])
    with pytest.raises(FirstStageMismatchError, match="sha256") as info:
        model.get_input(batch, "image")
    assert "\n" not in str(info.value)
    model.first_stage_model.load_state_dict(first_stage(cache["ckpt"]).state_dict())
    z, c = model.get_input(batch, "image")
    assert z.shape == (2, 3, 8, 8) and c is None
    torch.testing.assert_close(z, batch[CACHED_LATENT_KEY] * model.scale_factor)
    z1, _, x, xrec = model.get_input(batch, "image", return_first_stage_outputs=True, bs=1)  # what log_images asks
    assert z1.shape == (1, 3, 8, 8) and x.shape == xrec.shape == (1, 3, 32, 32) and torch.equal(x, xrec)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_bad_arguments_exit_2_in_one_line(cache, tmp_path, capsys):
    result = run_python(
        [SCRIPT, "--config", "x.yaml", "--data", "d", "--out", "o", "--crops", "0"], cwd=tmp_path, timeout=TIMEOUT
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--crops: 0 must be >= 1" in result.stderr
    base = ["--config", str(cache["config"]), "--data", str(cache["images"])]
    image = next(p for p in sorted(Path(cache["images"]).rglob("*")) if p.is_file())
    cases = [
        (["--config", str(tmp_path / "missing.yaml"), "--data", "d", "--out", str(tmp_path / "o")], "does not exist"),
        ([*base, "--out", str(tmp_path / "o"), "--size", "30"], "multiple of the first stage's downsampling factor 4"),
        (
            [
                "--config",
                str(cache["config"]),
                "--data",
                str(tmp_path / "none-{0..1}.tar"),
                "--out",
                str(tmp_path / "o"),
                "--split",
                "all",
            ],
            "shards are cached whole",
        ),
        (
            ["--config", str(cache["config"]), "--data", str(tmp_path / "none-{0..1}.tar"), "--out", str(tmp_path / "o")],
            "do not exist",
        ),
        (
            [*base, "--out", str(cache["out"]), "--split", "all", "--shard-size", "3", "--batch-size", "2", "--no-flip"],
            "holds a cache made with other settings (flip differ)",
        ),
        ([*base, "--out", ""], "--out: the path is empty"),  # wrote the cache into the current folder
        ([*base, "--out", str(tmp_path / "o"), "--size", "40000"], "--size: 40000 must be <= 4096"),  # a MemoryError
        ([*base, "--out", str(tmp_path / "o"), "--crops", "100000"], "--crops: 100000 must be <= 256"),
        (
            ["--config", str(cache["config"]), "--data", str(image), "--out", str(tmp_path / "o")],
            "is a file but not a .tar shard: pass the folder",  # read as a tar: an empty cache and "no readable image"
        ),
    ]
    for argv, expected in cases:
        try:
            code = cache_cli.main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    (tmp_path / "file").write_text("x")
    assert cache_cli.main([*base, "--out", str(tmp_path / "file" / "sub"), "--split", "all"]) == 3
    assert "output folder" in capsys.readouterr().err


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_torchrun_killed_mid_way_and_resumed_by_one_process_writes_the_bytes_of_an_uninterrupted_run(cache, tmp_path):
    """A 2-process torchrun job SIGKILLed after both processes wrote shards, then finished by a single process,
    leaves the same files as one uninterrupted run; an unreadable image is skipped, listed in its shard's sidecar,
    and the exit code says so."""
    images = tmp_path / "images"
    write_image_folder(images, 24)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["--config", str(cache["config"]), "--data", str(images), "--split", "all", "--shard-size", "1", "--batch-size", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        assert cache_cli.main([*args, "--out", str(tmp_path / "reference")]) == 1
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(SCRIPT),
            *args,
            "--out",
            str(out),
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    marks = [out / "latents-000002.json", out / "latents-000003.json"]  # written by rank 0 and by rank 1
    while proc.poll() is None and time.monotonic() < deadline and not all(m.exists() for m in marks):
        time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):  # the job may have ended first (then the assertion below says so)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(m.exists() for m in marks) and not (out / "index.json").exists(), "not killed mid-way"
    resumed = run_python([SCRIPT, *args, "--out", out], cwd=tmp_path, timeout=TIMEOUT, env=_env())
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "wrote 24 latents" in resumed.stdout and "1 input(s) unreadable" in resumed.stdout
    assert _files(out) == _files(tmp_path / "reference")
    assert not list(out.glob(".*.tmp"))
    skipped = [s for p in out.glob("latents-*.json") for s in json.loads(p.read_text())["skipped"]]
    assert [s["source"] for s in skipped] == ["broken.png"]


# ---------------------------------------------------------------------------------------------------------------------
# hostile inputs


def test_cache_latents_never_writes_over_its_inputs_or_into_a_folder_that_is_not_a_cache(cache, tmp_path, capsys):
    """`--data 'S/latents-{000000..000001}.tar' --out S` replaced the input shards with their latents (exit 0), and an
    --out holding an index.json of something else had it replaced.  Now each is one line, exit 2, before the model is
    loaded, and nothing changes on disk; an empty folder, a folder with a killed run's temp file only, and the run's
    own cache (resumed) are still accepted."""
    from conftest import write_image_shards

    shards = tmp_path / "S"
    shards.mkdir()
    write_image_shards(shards, [2, 2], prefix="latents")
    for i in range(2):  # the names of the cache's own shards
        (shards / f"latents-{i:02d}.tar").rename(shards / f"latents-{i:06d}.tar")
    pattern = str(shards / "latents-{000000..000001}.tar")
    before = _files(shards)
    result = run_python(
        [SCRIPT, "--config", cache["config"], "--data", pattern, "--out", shards], cwd=tmp_path, timeout=TIMEOUT, env=_env()
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "would overwrite the input" in result.stderr and "choose another --out" in result.stderr
    assert _files(shards) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"mine": true}')
    link_cache = tmp_path / "linked"
    import shutil

    shutil.copytree(cache["out"], link_cache)
    (link_cache / "latents-000000.tar").unlink()
    image = sorted(cache["images"].glob("*.png"))[0]
    (link_cache / "latents-000000.tar").symlink_to(image)
    base = ["--config", str(cache["config"]), "--shard-size", "3", "--batch-size", "2"]
    images = ["--data", str(cache["images"]), "--split", "all"]
    cases = [
        ([*images, "--out", str(cache["images"])], "--out is an input of --data"),
        ([*images, "--out", str(cache["root"])], "--out holds an input of --data"),
        (["--data", pattern, "--out", str(tmp_path)], "would overwrite the input"),
        ([*images, "--out", str(other)], "is not empty (1 entries, e.g. 'index.json') and is not a latent cache"),
        ([*images, "--out", str(link_cache)], "latents-000000.tar is a link to the input"),
    ]
    for argv, expected in cases:
        assert cache_cli.main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert (other / "index.json").read_text() == '{"mine": true}' and (link_cache / "latents-000000.tar").is_symlink()
    assert image.read_bytes()[:4] == b"\x89PNG"

    stale = tmp_path / "killed"
    stale.mkdir()
    (stale / ".plan.json.abcd1234.tmp").write_bytes(b"{")  # killed while writing its plan: not someone else's folder
    resumed = tmp_path / "resumed"
    shutil.copytree(cache["out"], resumed)
    (resumed / "latents-000002.json").unlink()  # an unfinished shard: resumed, not refused
    (resumed / "index.json").unlink()
    for out in (stale, resumed):
        assert cache_cli.main([*base, *images, "--out", str(out)]) == 0
        assert "wrote 8 latents" in capsys.readouterr().out
    assert _files(resumed) == _files(cache["out"])


def test_cached_latents_skip_nan_and_infinite_latents(cache, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache["out"], copy)
    sidecar = json.loads((copy / "latents-000000.json").read_text())
    for sample, value in zip(sidecar["samples"][:2], (np.nan, np.inf)):
        with open(copy / "latents-000000.tar", "r+b") as fh:  # one value of the array (after its 128-byte header)
            fh.seek(sample["offset"] + 128 + 4 * 7)
            fh.write(np.float32(value).tobytes())
    dataset = CachedLatents(copy)
    items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 2 and all(torch.isfinite(it[CACHED_LATENT_KEY]).all() for it in items)
    assert "NaN or infinite" in caplog.text
    assert [it["file_path_"] for it in items[:3]] == [sidecar["samples"][2]["source"]] * 3


def test_a_huge_brace_pattern_is_one_line_before_any_work(cache, tmp_path):
    """`--data 'x-{0..99999999}.tar'` ended in a MemoryError traceback; {0..9999999} took 74 s and 2.5 GB."""
    started = time.monotonic()
    argv = [SCRIPT, "--config", cache["config"], "--data", tmp_path / "x-{0..99999999}.tar", "--out", tmp_path / "out"]
    result = run_python(argv, cwd=tmp_path, timeout=TIMEOUT, env=_env())
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "expand to 100,000,000 shard names, more than the 1,000,000 allowed" in result.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


def test_index_json_values_must_have_exactly_their_types(cache, tmp_path):
    """index.json took "flip": "false" as True, "samples": 2.9 as 2, "3" and true as numbers (sizes.json refused all
    of these).  Now every value must have its exact JSON type; the error names the file and the key."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache["out"], copy)
    good = json.loads((copy / "index.json").read_text())
    assert read_index(copy).flip is True
    cases = [
        ({"flip": "false"}, "flip is 'false' (str), but it must be true or false"),
        ({"size": "32"}, "size is '32' (str), but it must be a positive integer"),
        ({"size": True}, "size is True (bool), but it must be a positive integer"),
        ({"n_crops": 1.0}, "n_crops is 1.0 (float), but it must be an integer >= 1"),
        ({"n_crops": 0}, "n_crops is 0 (int), but it must be an integer >= 1"),
        ({"skipped": -1}, "skipped is -1 (int), but it must be an integer >= 0"),
        ({"latent_shape": [3, 2.0, 2]}, "latent_shape is [3, 2.0, 2] (list), but it must be a list [C, h, w]"),
        ({"first_stage_sha256": 5}, "first_stage_sha256 is 5 (int), but it must be a sha256"),
        ({"settings": []}, "settings is [] (list), but it must be an object"),
        ({"shards": [{"name": "latents-000000.tar", "samples": 2.9}]}, "shards[0].samples is 2.9 (float)"),
        ({"shards": [{"name": "latents-000000.tar", "samples": "3"}]}, "shards[0].samples is '3' (str)"),
        ({"shards": [{"name": "latents-000000.tar", "samples": True}]}, "shards[0].samples is True (bool)"),
        ({"shards": [{"name": "../x.tar", "samples": 1}]}, "shards[0].name is '../x.tar' (str), but it must be a plain"),
        ({"shards": {"a": 1}}, "shards is {'a': 1} (dict), but it must be a list"),
    ]
    for change, expected in cases:
        (copy / "index.json").write_text(json.dumps(good | change))
        with pytest.raises(ConfigError) as info:
            read_index(copy)
        message = str(info.value)
        assert message.startswith(str(copy / "index.json")) and expected in message and "\n" not in message, message
    (copy / "index.json").write_text(json.dumps({k: v for k, v in good.items() if k != "flip"}))
    with pytest.raises(ConfigError, match="key 'flip' is missing; it must be true or false"):
        read_index(copy)


def test_a_forged_shard_header_is_one_line_and_the_other_shards_are_cached(cache, tmp_path, capsys, monkeypatch):
    """A 9.7 KB shard with a pax header claiming 2**40 bytes ended cache_latents.py in a MemoryError traceback and the
    good shard after it in the `::` list was never cached; `--data '${HOME}/x.tar'` was webdataset's AssertionError."""
    import tarfile

    from test_shard_stream import forged_header, good_member, tar_member, write_forged

    from conftest import write_image_shards

    bad = write_forged(tmp_path / "bad.tar", good_member("a"), forged_header("x", 2**40, tarfile.XHDTYPE), good_member("c", 1))
    good = write_image_shards(tmp_path, [2], prefix="good").replace("{00..00}", "00")
    out = tmp_path / "out"
    argv = ["--config", str(cache["config"]), "--data", f"{bad}::{good}", "--out", str(out), "--batch-size", "2"]
    assert cache_cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "wrote 2 latents" in captured.out
    (skipped,) = json.loads((out / "latents-000000.json").read_text())["skipped"]
    assert skipped["source"] == "bad.tar#(the whole shard: the shard breaks there)"
    assert "pax extension header of 1,099,511,627,776 bytes" in skipped["error"]
    assert len(json.loads((out / "latents-000001.json").read_text())["samples"]) == 2
    # a member that is no image: its error is worded without the in-memory file's address (the sidecar's bytes
    # differed from run to run)
    junk = write_forged(tmp_path / "junk.tar", tar_member("j.png", b"not an image"), good_member("k"))
    for run in ("a", "b"):
        assert cache_cli.main([*argv[:2], "--data", junk, "--out", str(tmp_path / run), "--batch-size", "2"]) == 1
    sidecars = [(tmp_path / run / "latents-000000.json").read_bytes() for run in ("a", "b")]
    assert sidecars[0] == sidecars[1] and b" object at 0x" not in sidecars[0]
    capsys.readouterr()
    monkeypatch.delenv("WDS_HOME", raising=False)
    assert cache_cli.main(["--config", str(cache["config"]), "--data", "${HOME}/x.tar", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WDS_HOME is not set" in err[0] and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# overrides, the first stage's hint, the early refusal, README's cached-data YAML layered

# README, "Train from cached latents": what a user layers over a window config with main.py -b config.yaml <this> -t
README_CACHED_DATA = """\
data:
  target: ldm.data.datamodule.DataModuleFromConfig
  params:
    batch_size: 48
    num_workers: 8
    train:
      target: ldm.data.cached_latents.CachedLatents
      params: {root: cache/train}
"""
FIRST_STAGE_KEY = "model.params.first_stage_config.params.ckpt_path"


def test_cache_latents_takes_main_py_overrides_wherever_they_stand(cache, tmp_path):
    """The quick start's config with its VQ named on the command line (README's command), and a config key overridden:
    the cache holds that first stage's latents at that size."""
    for i, where in enumerate(("after --config", "at the end")):
        override = [f"{FIRST_STAGE_KEY}={cache['ckpt']}", "data.params.train.params.size=16"]
        args = ["--data", str(cache["images"]), "--out", str(tmp_path / f"c{i}"), "--split", "all"]
        argv = ["--config", str(QUICKSTART), *override, *args] if i == 0 else ["--config", str(QUICKSTART), *args, *override]
        assert cache_cli.main(argv) == 0, where
        index = read_index(tmp_path / f"c{i}")
        assert index.size == 16 and index.latent_shape == (3, 4, 4) and index.num_samples == 8
        assert index.first_stage_sha256 == read_index(cache["out"]).first_stage_sha256


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([f"{FIRST_STAGE_KEY[:-1]}x=a.ckpt"], "VQModelInterface takes no argument 'ckpt_patx' (did you mean 'ckpt_path'?)"),
        (["modle.params.t_min=3"], "unknown override key 'modle.params.t_min': top-level keys are model, data, lightning"),
        (["model.params.unet_config.params.channel_mult=[1"], "cannot parse the override"),
        (["model.params.t_min=${nope}"], "cannot resolve the config at model.params.t_min"),
        (["stray"], "unexpected argument 'stray': configs go after --config, overrides are key=value"),
        (["--flipp"], "unrecognized option '--flipp' (did you mean --flip?)"),
        (["~data.params.test"], "cannot delete 'data.params.test' (~data.params.test): data.params has no key 'test'"),
        (["~data.params.validation=1"], "a deletion is ~key alone (no '=')"),
        (["lightning.trainer.gpus=1"], "lightning.trainer.gpus is a Lightning 1.x Trainer argument"),
    ],
)
def test_bad_overrides_of_cache_latents_exit_2_in_one_line_and_write_nothing(cache, extra, expected, tmp_path, capsys):
    before = _files(cache["out"])
    argv = ["--config", str(cache["config"]), "--data", str(cache["images"]), "--out", str(tmp_path / "out"), *extra]
    assert cache_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cache_latents.py: error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists() and _files(cache["out"]) == before


def test_cache_latents_needs_a_config_file_besides_overrides(tmp_path, capsys):
    argv = ["--config", "model.params.t_min=0", "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cache_cli.main(argv) == 2
    assert "--config needs at least one YAML file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_first_stage_names_the_config_that_trains_it(cache, tmp_path, capsys):
    """README's cache_latents.py command before the quick start ran: the config's own ckpt_path, the config that
    trains this first stage and the key to pass; nothing written."""
    argv = ["--config", str(QUICKSTART), "--data", str(cache["images"]), "--out", str(tmp_path / "out"), "--split", "all"]
    missing = tmp_path / "outputs" / "vq_f4.ckpt"
    for extra, named in (
        ([], "models/first_stage_models/vq-f4-tiny/model.ckpt"),
        ([f"{FIRST_STAGE_KEY}={missing}"], str(missing)),
    ):
        assert cache_cli.main([*argv, *extra]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"first-stage checkpoint {named!r} does not exist" in line
        assert "train it with python main.py --base " in line and "configs/quickstart/vq_f4.yaml -t" in line
        assert "python scripts/quickstart.py" in line and f"pass {FIRST_STAGE_KEY}=<its checkpoint>" in line
        assert "CompVis" not in line
        assert not (tmp_path / "out").exists()


def test_a_cache_of_another_first_stage_is_refused_before_a_run_folder_is_made(cache, tmp_path, capsys):
    """README's YAML layered over a config whose first stage is not the cache's: one line naming both hashes, exit 2,
    no log folder (the cache and the configs untouched)."""
    other = make_first_stage_ckpt(tmp_path / "other_vq.ckpt", seed=1)
    overlay = tmp_path / "my_cached_data.yaml"
    overlay.write_text(README_CACHED_DATA)
    before = _files(cache["out"])
    argv = [
        "-b",
        str(QUICKSTART),
        str(overlay),
        "-t",
        "-l",
        str(tmp_path / "logs"),
        f"{FIRST_STAGE_KEY}={other}",
        f"data.params.train.params.root={cache['out']}",
        "data.params.num_workers=0",
        "data.params.batch_size=4",
    ]
    code, err = run_main(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("main.py: error: "), err[-3000:]
    theirs, ours = read_index(cache["out"]).first_stage_sha256, first_stage_sha256(first_stage(other))
    assert theirs in lines[0] and ours in lines[0] and "data.params.train" in lines[0] and "cache_latents.py" in lines[0]
    assert not (tmp_path / "logs").exists()
    assert _files(cache["out"]) == before and overlay.read_text() == README_CACHED_DATA
