"""Tar-shard streams (ldm/data/shard_stream.py): the epoch plan, resume, unreadable data, latents from image shards and
a 2-process DDP run of main.py over 3 uneven shards.  Reading the tars themselves (ldm/data/tar_shards.py) is tested
in test_tar_shards.py, which builds its hostile tars with the helpers here."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.resumable import make_resumable
from ldm.data.shard_stream import ImageShards, LatentShards, ShardStream, ShardStreamLoader
from ldm.util import ConfigError

from conftest import write_image_shards
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "latesteps_500_750.yaml"
COUNTS = [5, 9, 3]  # 17 samples in 3 uneven shards
TIMEOUT = 600


class NumberShards(ShardStream):
    """Yields each sample's number (the ``.cls`` member written by ``write_image_shards``) without decoding images."""

    def decode(self, sample, index, rng):
        return {"n": int(sample["cls"]), "index": index}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_image_shards(tmp_path_factory.mktemp("shards"), COUNTS)


def numbers(loader) -> list[list[int]]:
    return [batch["n"].tolist() for batch in loader]


def loader_for(
    dataset: ShardStream, batch: int, rank: int, world: int, workers: int = 0, shuffle: bool = True, drop_last: bool = True
) -> ShardStreamLoader:
    dataset.configure(batch, rank, world, shuffle=shuffle, drop_last=drop_last)
    return ShardStreamLoader(dataset, num_workers=workers)


# ---------------------------------------------------------------------------------------------------------------------
# the plan


@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    world=st.integers(1, 4),
    workers=st.integers(1, 4),
    batch=st.integers(1, 5),
    drop_last=st.booleans(),
)
def test_worker_runs_partition_each_ranks_share_into_equal_batch_counts(counts, world, workers, batch, drop_last):
    dataset = ShardStream.__new__(ShardStream)  # the plan only needs the sizes
    dataset.counts, dataset.offsets = counts, np.concatenate([[0], np.cumsum(counts)])
    dataset.batch_size, dataset.world_size, dataset.drop_last = batch, world, drop_last
    per_rank = sum(counts) // world
    for rank in range(world):
        dataset.rank = rank
        runs = dataset.worker_runs(workers)
        assert sum(b for _, _, b in runs) == dataset.num_batches()
        assert [s for s, _, _ in runs] == list(np.cumsum([rank * per_rank] + [n for _, n, _ in runs])[:-1])
        used = sum(n for _, n, _ in runs)
        assert used == (per_rank // batch * batch if drop_last else per_rank)
        assert max(b for _, _, b in runs) - min(b for _, _, b in runs) <= 1
        assert all(0 < n <= b * batch for _, n, b in runs if b) and all(n == 0 for _, n, b in runs if not b)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_read_disjoint_samples_in_equal_batches_and_reshuffle_per_epoch(shards, workers):
    dataset = NumberShards(shards, shuffle_buffer=3)
    assert len(dataset) == 17 and dataset.counts == COUNTS
    epochs = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        per_rank = [numbers(loader_for(dataset, 2, rank, 2, workers)) for rank in range(2)]
        assert [len(b) for b in per_rank] == [4, 4]  # 17 // 2 = 8 samples per rank, 4 batches
        flat = [n for batches in per_rank for batch in batches for n in batch]
        assert len(flat) == len(set(flat)) == 16 and set(flat) <= set(range(17))
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]
    validation = [numbers(loader_for(dataset, 3, rank, 2, workers, shuffle=False, drop_last=False)) for rank in range(2)]
    if workers == 0:  # in order: rank r reads samples [8 r, 8 r + 8), the last batch partial
        assert validation == [[[0, 1, 2], [3, 4, 5], [6, 7]], [[8, 9, 10], [11, 12, 13], [14, 15]]]
    assert [sorted(sum(v, [])) for v in validation] == [list(range(8)), list(range(8, 16))]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_the_epoch_exactly(shards, workers):
    dataset = NumberShards(shards, shuffle_buffer=3, seed=4)
    dataset.set_epoch(1)
    reference = numbers(loader_for(dataset, 2, 1, 2, workers))
    for k in range(len(reference)):
        loader = loader_for(dataset, 2, 1, 2, workers)
        iterator = iter(loader)
        seen = [next(iterator)["n"].tolist() for _ in range(k)]
        state = loader.state_dict()
        assert state == {"epoch": 1, "batches": k}
        restored = loader_for(dataset, 2, 1, 2, workers)
        restored.load_state_dict(state)
        assert seen + numbers(restored) == reference
        assert restored.state_dict() == {"epoch": 1, "batches": len(reference)}
    dataset.set_epoch(2)
    restored = loader_for(dataset, 2, 1, 2, workers)
    restored.load_state_dict({"epoch": 1, "batches": 3})  # a position in another epoch is ignored
    assert len(numbers(restored)) == 4


def test_the_data_module_serves_streams_and_main_leaves_them_alone(shards):
    module = DataModuleFromConfig(batch_size=2, train={"target": "ldm.data.shard_stream.ImageShards", "params": {}})
    dataset = NumberShards(shards)
    module.datasets["train"] = dataset
    loader = module._train_dataloader()
    assert isinstance(loader, ShardStreamLoader) and len(loader) == 8
    assert make_resumable(loader, seed=0, rank=1, world_size=2) is loader


def test_unreadable_samples_and_shards_are_replaced_and_counted(tmp_path, caplog):
    pattern = write_image_shards(tmp_path, [4, 4])
    corrupt = tmp_path / "img-02.tar"
    corrupt.write_bytes(b"not a tar file" * 100)
    from ldm.data.tar_shards import write_tar

    with open(tmp_path / "img-03.tar", "wb") as fh:  # one good sample, one that is not an image
        write_tar(fh, [("a.png", _png()), ("b.png", b"garbage")])
    dataset = ImageShards(str(tmp_path / "img-{00..03}.tar"), size=32, shuffle_buffer=4)
    assert dataset.counts == [4, 4, 0, 2] and dataset.skipped_shards == [str(corrupt)]
    assert "leaving out unreadable shard" in caplog.text
    batches = list(loader_for(dataset, 2, 0, 1))
    assert len(batches) == 5 and all(b["image"].shape == (2, 32, 32, 3) for b in batches)
    assert dataset.num_skipped == 1 and "skipping unreadable" in caplog.text
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"img-00.tar": 6, "img-01.tar": 4, "img-02.tar": 0, "img-03.tar": 2}))
    truncated = ImageShards(pattern.replace("01}", "03}"), size=32, sizes=sizes, shuffle_buffer=4)
    assert len(list(loader_for(truncated, 2, 0, 1))) == 6  # the 2 samples img-00 lacks are replaced
    assert truncated.num_skipped == 3
    with pytest.raises(ConfigError, match="not a JSON object"):
        ImageShards(pattern, sizes=tmp_path / "img-00.tar")
    sizes.write_text(json.dumps({"img-00.tar": 4}))
    with pytest.raises(ConfigError, match="no sample count"):
        ImageShards(pattern, sizes=sizes)
    with pytest.raises(ConfigError, match="do not exist"):
        ImageShards(str(tmp_path / "img-{00..09}.tar"))


def _png() -> bytes:
    from conftest import noise_png

    return noise_png(40, 32, seed=5)


def test_latent_shards_of_image_shards_stream_the_encoded_images(shards, tmp_path, capsys):
    """cache_latents.py over image shards keeps their shards; LatentShards then yields, batch for batch, the latents
    of what ImageShards yields (centre crops; flips drawn alike)."""
    spec = importlib.util.spec_from_file_location("cache_cli", REPO / "scripts" / "cache_latents.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    from test_latent_cache import first_stage, make_first_stage_ckpt, project_config

    ckpt = make_first_stage_ckpt(tmp_path / "vq.ckpt", seed=0)
    config = project_config(tmp_path / "config.yaml", ckpt, {})
    assert cli.main(["--config", str(config), "--data", shards, "--out", str(tmp_path / "cache"), "--batch-size", "4"]) == 0
    assert "wrote 17 latents" in capsys.readouterr().out
    images = ImageShards(shards, size=32, random_crop=False, seed=2, shuffle_buffer=4)
    latents = LatentShards(str(tmp_path / "cache"), seed=2, shuffle_buffer=4)
    assert latents.counts == COUNTS
    model = first_stage(ckpt)
    for epoch in (0, 1):
        images.set_epoch(epoch)
        latents.set_epoch(epoch)
        for a, b in zip(loader_for(images, 4, 1, 2), loader_for(latents, 4, 1, 2), strict=True):
            with torch.no_grad():
                z = model.encode(a["image"].permute(0, 3, 1, 2).contiguous())
            torch.testing.assert_close(b["cached_latent"], z, rtol=1e-5, atol=1e-5)
            assert b["file_path_"] == a["file_path_"]


# ---------------------------------------------------------------------------------------------------------------------
# DDP

RECORDER = """
import json
import pytorch_lightning as pl


class SampleRecorder(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(f"{self.path}.{trainer.global_rank}", "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "keys": list(batch["file_path_"])}) + "\\n")
"""


def _records(path: Path) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_over_three_uneven_shards_ends_and_resumes_without_repeats(shards, tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART))
    cfg["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = None
    train = {"target": "ldm.data.shard_stream.ImageShards", "params": {"shards": shards, "size": 32, "shuffle_buffer": 4}}
    cfg["data"]["params"] = {"batch_size": 2, "num_workers": 0, "train": train}
    cfg["lightning"]["trainer"].update(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_steps=3,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    cfg["lightning"]["callbacks"]["image_logger"]["params"]["disabled"] = True
    cfg["lightning"]["callbacks"]["recorder"] = {
        "target": "recorder.SampleRecorder",
        "params": {"path": str(tmp_path / "seen")},
    }
    cfg["lightning"]["modelcheckpoint"]["params"]["every_n_train_steps"] = 1
    (tmp_path / "ddp.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LATESTEPS_LOGDIR", None)
    main = REPO / "main.py"
    first = run_python([main, "-b", "ddp.yaml", "-t", "-n", "ddp", "-l", "logs"], cwd=tmp_path, env=env, timeout=TIMEOUT)
    assert first.returncode == 0, first.stderr[-4000:]
    (run,) = (tmp_path / "logs").glob("*_ddp")
    resumed = run_python([main, "-t", "-r", run, "lightning.trainer.max_steps=6"], cwd=tmp_path, env=env, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    dataset = ImageShards(shards, size=32, shuffle_buffer=4)
    seen = [_records(tmp_path / f"seen.{rank}") for rank in range(2)]
    assert [len(s) for s in seen] == [6, 6]  # steps 0-2 before the restart, 3-5 after: equal on both ranks
    for rank in range(2):
        expected = []
        for epoch in (0, 1):  # 17 // 2 = 8 samples per rank and epoch: 4 batches of 2
            dataset.set_epoch(epoch)
            expected += [batch["file_path_"] for batch in loader_for(dataset, 2, rank, 2)]
        assert seen[rank] == expected[:6]
    epoch0 = [k for rank in range(2) for batch in seen[rank][:4] for k in batch]
    assert len(epoch0) == len(set(epoch0)) == 16


# ---------------------------------------------------------------------------------------------------------------------
# hostile shards: short shards, absurd counts, tar bombs, bad latent samples


def test_a_short_shard_costs_linear_time_and_its_missing_samples_are_counted_once(tmp_path, caplog, monkeypatch):
    """4 real samples, 2,000 declared: an empty block must not scan the rest of the run for a readable one (that took
    5.7 s, "250,000 skipped").  The shard is opened 3 times in all, the 1,996 missing samples are counted once each with
    one warning, and a loader restored mid-epoch continues exactly."""
    import ldm.data.shard_stream as shard_stream

    pattern = write_image_shards(tmp_path, [4])
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"img-00.tar": 2000}))
    opened = []
    real_iter_samples = shard_stream.iter_samples
    monkeypatch.setattr(shard_stream, "iter_samples", lambda url, **kw: opened.append(url) or real_iter_samples(url, **kw))
    dataset = NumberShards(pattern, sizes=sizes, shuffle_buffer=4)
    reference = numbers(loader_for(dataset, 2, 0, 1))
    assert len(reference) == 1000 and all(n in range(4) for batch in reference for n in batch)
    assert dataset.num_skipped == 1996 and len(opened) == 3
    assert caplog.text.count("ends before sample 4, but its count says 2000") == 1
    for k in (1, 3, 700):
        restored = loader_for(dataset, 2, 0, 1)
        restored.load_state_dict({"epoch": 0, "batches": k})
        assert numbers(restored) == reference[k:]


def test_sample_counts_are_checked_and_name_the_file(tmp_path):
    pattern = write_image_shards(tmp_path, [2])
    sizes = tmp_path / "sizes.json"
    for count, expected in (
        (2**63 - 1, "more than the 4,294,967,296 a shard may hold"),
        (True, "no sample count"),
        (-1, "no sample count"),
        (1.5, "no sample count"),
    ):
        sizes.write_text(json.dumps({"img-00.tar": count}))
        with pytest.raises(ConfigError, match=expected) as info:
            NumberShards(pattern, sizes=sizes)
        assert str(sizes) in str(info.value)
    sizes.write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than the JSON parser's recursion
    with pytest.raises(ConfigError, match="not a JSON object"):
        NumberShards(pattern, sizes=sizes)


def sparse_tar_member(name: str, size: int) -> bytes:
    """The 512-byte header of a GNU sparse member that claims ``size`` bytes and stores none (a tar bomb's member)."""
    import tarfile

    info = tarfile.TarInfo(name)
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[156:157] = tarfile.GNUTYPE_SPARSE
    buf[386:410] = b"%011o\0" % 0 + b"%011o\0" % 0  # one sparse chunk of no bytes
    buf[483:495] = b"%011o\0" % size  # the member's real size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


def write_bomb_shard(path: Path) -> None:
    """A 20 KB shard: a good PNG sample, a 2 GiB sparse PNG member, another good sample."""
    import io
    import tarfile

    from conftest import noise_png

    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            data = noise_png(40, 34, seed=1)
            info = tarfile.TarInfo("a.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            fh.write(sparse_tar_member("bomb.png", 2 << 30))
            tar.offset += 512
            data = noise_png(40, 34, seed=2)
            info = tarfile.TarInfo("c.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_bomb_member_is_skipped_without_being_read(tmp_path, caplog):
    """A 10 KB shard with a sparse 2 GiB member took 2.9 GB: its size is now checked before anything is read."""
    import tracemalloc

    from ldm.data.tar_shards import SAMPLE_ERROR_KEY, iter_samples

    shard = tmp_path / "bomb-0.tar"
    write_bomb_shard(shard)
    assert shard.stat().st_size < 32 << 10
    tracemalloc.start()
    try:
        samples = list(iter_samples(str(shard)))
        dataset = ImageShards(str(shard), size=32, shuffle_buffer=4)
        batches = list(loader_for(dataset, 3, 0, 1, shuffle=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6
    assert [s["__key__"] for s in samples] == ["a", "bomb", "c"] and "png" not in samples[1]
    assert "'bomb.png' is 2,147,483,648 bytes, more than the 67,108,864" in samples[1][SAMPLE_ERROR_KEY]
    assert len(batches) == 1 and batches[0]["image"].shape == (3, 32, 32, 3)  # the bomb replaced by a readable sample
    assert batches[0]["file_path_"][:2] == ["bomb-0.tar#a", "bomb-0.tar#c"]
    assert dataset.num_skipped == 1 and "skipping unreadable bomb-0.tar#bomb" in caplog.text
    assert "member 'bomb.png'" in caplog.text


LATENT = (2, 3, 4, 4)  # two variants (a centre crop and its mirror image) of a 3x4x4 latent


def latent_sample(key: str, array: np.ndarray | bytes | None = None, meta: dict | bytes | None = None):
    """The two members of a cached-latent sample (defaults: a good one)."""
    from ldm.data.latent_format import encode_npy

    if array is None:
        array = np.full(LATENT, float(len(key)), np.float32)
    if meta is None:
        meta = {
            "source": key,
            "first_stage_sha256": "f" * 64,
            "variants": [{"top": 0, "left": 0, "flip": False}, {"top": 0, "left": 0, "flip": True}],
        }
    npy = array if isinstance(array, bytes) else encode_npy(array)
    return [(f"{key}.latent.npy", npy), (f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())]


def huge_npy_header() -> bytes:
    """.npy bytes whose header claims a first dimension of 2**64 (numpy accepts it; the product overflowed)."""
    from ldm.data.latent_format import encode_npy

    good = encode_npy(np.zeros(LATENT, np.float32))
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551616, 3, 4, 4), }"
    header += " " * (118 - len(header)) + "\n"
    return good[:8] + len(header).to_bytes(2, "little") + header.encode() + good[128:]


def test_one_bad_latent_sample_is_skipped_and_counted_not_fatal(tmp_path, caplog):
    """Each of these would stop training: IndexError (no variants; a JSON lying about their count), RecursionError
    (deep JSON under the size limit), OverflowError (a 2**64 .npy dimension), a collate RuntimeError (a latent of another
    shape); NaN and inf latents would go into batches.  Each is skipped and counted, in the cache folder and over a
    pattern of its shards (no index: the shape is the first samples' majority)."""
    from ldm.data.latent_format import FORMAT
    from ldm.data.tar_shards import write_tar

    good_meta = latent_sample("x")[1][1]
    nan, inf = np.zeros(LATENT, np.float32), np.zeros(LATENT, np.float32)
    nan[1, 2, 3, 0], inf[0, 0, 0, 0] = np.nan, -np.inf
    bad = {
        "no-variants": latent_sample(
            "no-variants", np.zeros((0, 3, 4, 4), np.float32), {"source": "s", "first_stage_sha256": "f", "variants": []}
        ),
        "lying-count": latent_sample(
            "lying-count",
            meta=json.loads(good_meta)
            | {
                "variants": [
                    {"top": 0, "left": 0, "flip": False},
                    {"top": 0, "left": 0, "flip": True},
                    {"top": 0, "left": 9, "flip": False},
                ]
            },
        ),
        "one-crop-two-flips": latent_sample(
            "one-crop-two-flips",
            meta=json.loads(good_meta)
            | {"variants": [{"top": 0, "left": 0, "flip": True}, {"top": 0, "left": 0, "flip": True}]},
        ),
        "deep-json": latent_sample("deep-json", meta=b"[" * 20_000 + b"]" * 20_000),
        "huge-header": latent_sample("huge-header", huge_npy_header()),
        "other-shape": latent_sample("other-shape", np.zeros((2, 3, 4, 5), np.float32)),
        "nan": latent_sample("nan", nan),
        "inf": latent_sample("inf", inf),
        "variant-not-object": latent_sample("variant-not-object", meta=json.loads(good_meta) | {"variants": [1, 2]}),
    }
    names = list(bad)
    members = []
    for i in range(12):  # good samples between the bad ones
        members += latent_sample(f"good{i:02d}")
        if i < len(names):
            members += bad[names[i]]
    with open(tmp_path / "latents-000000.tar", "wb") as fh:
        write_tar(fh, members)
    n = 12 + len(names)
    (tmp_path / "index.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "first_stage_sha256": "f" * 64,
                "size": 16,
                "latent_shape": list(LATENT[1:]),
                "dtype": "float32",
                "n_crops": 1,
                "flip": True,
                "shards": [{"name": "latents-000000.tar", "samples": n}],
            }
        )
    )
    for shards in (str(tmp_path), str(tmp_path / "latents-000000.tar")):
        dataset = LatentShards(shards, shuffle_buffer=6)
        assert len(dataset) == n
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            before = dataset.num_skipped
            batches = list(loader_for(dataset, 3, 0, 1))
            assert len(batches) == n // 3
            for batch in batches:
                assert batch["cached_latent"].shape == (3, *LATENT[1:]) and torch.isfinite(batch["cached_latent"]).all()
                assert all(path.startswith("good") for path in batch["file_path_"])
            assert dataset.num_skipped - before == len(names)
        assert dataset.sample_shape == LATENT
    for name in names:
        assert f"latents-000000.tar#{name}" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# forged headers (a hostile tester's tars: /tmp/attack/T/mk.py)


def forged_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    """A 512-byte GNU header of type ``kind`` whose size field is base-256 ``size`` (any int, negative included)."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = kind
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))[:512]
    buf[124:136] = bytes([0xFF if size < 0 else 0x80]) + (size & ((1 << 88) - 1)).to_bytes(11, "big")
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def tar_member(name: str, data: bytes) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def write_forged(path: Path, *parts: bytes) -> str:
    path.write_bytes(b"".join(parts) + b"\0" * 1024)
    return str(path)


def good_member(key: str, seed: int = 0) -> bytes:
    from conftest import noise_png

    return tar_member(f"{key}.png", noise_png(34, 34, seed=seed))


def test_forged_extension_headers_are_refused_before_tarfile_reads_them(tmp_path, caplog):
    """A 9.7 KB shard with a GNU long-name ('L'), pax ('x') or global pax ('g') header claiming 2**40 bytes raised
    MemoryError (tarfile reads such a header whole while iterating) and stopped the run; a negative size moved the next
    header backwards.  Now each is a ShardFormatError (one of TAR_READ_ERRORS): the loader skips and counts."""
    import re
    import tarfile
    import time
    import tracemalloc

    from ldm.data.tar_shards import TAR_READ_ERRORS, ShardFormatError, count_samples, iter_samples

    forged = {
        "longname": (
            forged_header("././@LongLink", 2**40, tarfile.GNUTYPE_LONGNAME),
            "GNU long-name extension header of 1,099,511,627,776 bytes, more than the 1,048,576 allowed",
        ),
        "pax": (forged_header("././@PaxHeader", 2**40, tarfile.XHDTYPE), "pax extension header"),
        "globalpax": (forged_header("././@PaxHeader", 2**40, tarfile.XGLTYPE), "pax extension header"),
        "negative": (forged_header("b.png", -1024), "gives 'b.png' a negative size (-1,024)"),
        "chain": (forged_header("././@LongLink", 1, tarfile.GNUTYPE_LONGNAME) + b"x" + b"\0" * 511, "in a row"),
    }
    assert issubclass(ShardFormatError, TAR_READ_ERRORS)
    started = time.monotonic()
    tracemalloc.start()
    try:
        for name, (header, expected) in forged.items():
            repeat = 3000 if name == "chain" else 1  # a chain deeper than Python's recursion limit
            url = write_forged(tmp_path / f"{name}.tar", good_member("a"), header * repeat, good_member("c", 1))
            expected = re.escape(expected)
            with pytest.raises(ShardFormatError, match=expected):
                list(iter_samples(url))
            with pytest.raises(ShardFormatError, match=expected):
                count_samples(url)
            with pytest.raises(ShardFormatError, match=expected):  # a stream reads the same headers
                list(iter_samples(f"pipe:cat {url}"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6 and time.monotonic() - started < 30
    # the training loader: counted from the headers, the forged shard is left out; with sizes it is read, skipped
    good = write_image_shards(tmp_path, [3], prefix="good").replace("{00..00}", "00")
    dataset = ImageShards([str(tmp_path / "pax.tar"), good], size=32, shuffle_buffer=4)
    assert dataset.skipped_shards == [str(tmp_path / "pax.tar")] and len(dataset) == 3
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"pax.tar": 2, "good-00.tar": 3}))
    dataset = ImageShards([str(tmp_path / "pax.tar"), good], size=32, sizes=sizes, shuffle_buffer=5)
    (batch,) = list(loader_for(dataset, 5, 0, 1, shuffle=False))
    assert batch["image"].shape == (5, 32, 32, 3) and dataset.num_skipped == 2
    assert "skipping unreadable pax.tar samples 0..1 (ShardFormatError: the header at byte" in caplog.text
