"""The safe checkpoint loader: round trips, Lightning-1.x pickles, refusal of code, clear errors."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.checkpoint import (
    CheckpointError,
    LegacyObject,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict,
    load_weights,
    save_checkpoint,
    sha256_file,
)
from ldm.util import instantiate_from_config

from conftest import tiny_first_stage_config, tiny_ldm_params


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    return net.state_dict()


class _Exploit:
    """Unpickling this runs os.system and creates a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    sd = _state_dict()
    path = tmp_path / f"model{suffix}"
    save_checkpoint(
        {"state_dict": sd, "metadata": {"window": "250,500"}}
        if suffix == ".safetensors"
        else {"state_dict": sd, "global_step": 7},
        path,
    )
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])
    ckpt = load_checkpoint(path)
    if suffix == ".safetensors":
        assert ckpt["metadata"] == {"window": "250,500"}
    else:
        assert ckpt["global_step"] == 7
    assert len(sha256_file(path)) == 64


def test_bare_state_dict_is_wrapped(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "bare.pt")
    assert load_checkpoint(tmp_path / "bare.pt").keys() == {"state_dict"}


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _state_dict(), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system|nt\.system") as err:
        load_checkpoint(path)
    assert "--unsafe-load" in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump(_Exploit(str(marker)), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_lightning_1x_checkpoint_yields_state_dict_without_running_code(tmp_path):
    """Lightning 1.x pickled callback classes as dict keys and OmegaConf hyper-parameters (CompVis checkpoints)."""
    sd = _state_dict()
    legacy = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "dirpath": "logs/x"}},
        "hyper_parameters": {"cfg": OmegaConf.create({"model": {"lr": 1e-4}})},
        "optimizer_states": [],
    }
    path = tmp_path / "compvis.ckpt"
    torch.save(legacy, path)
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 1000
    for k in sd:
        assert torch.equal(ckpt["state_dict"][k], sd[k])
    (key,) = ckpt["callbacks"].keys()
    assert issubclass(key, LegacyObject) and key.__module__.startswith("pytorch_lightning")
    assert isinstance(ckpt["hyper_parameters"]["cfg"], LegacyObject)


def test_unsafe_opt_in_loads_trusted_pickle(tmp_path):
    path = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": _state_dict(), "extra": {1, 2}, "cls": torch.nn.Linear}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert load_checkpoint(path, unsafe=True)["cls"] is torch.nn.Linear


def test_missing_empty_truncated_directory_wrong_kind(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    os.mkfifo(tmp_path / "fifo.ckpt")  # was "empty (0 bytes); truncated"
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_checkpoint(tmp_path / "fifo.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.ckpt")
    (tmp_path / "text.ckpt").write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    for name, sd in [("intkey", {3: torch.zeros(1)}), ("strvalue", {"w": "x"})]:  # AttributeError in drop_keys before
        torch.save({"state_dict": sd}, tmp_path / f"{name}.ckpt")
        with pytest.raises(CheckpointError, match="a state dict maps parameter names \\(str\\) to tensors"):
            load_state_dict(tmp_path / f"{name}.ckpt")
    torch.save({"epoch": 1}, tmp_path / "nosd.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_state_dict(tmp_path / "nosd.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"

    def boom(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"state_dict": {}}, path)
    assert list(path.parent.iterdir()) == []


def test_load_weights_names_shape_mismatches():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    other = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)).state_dict()
    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \[6, 4\] vs model \[8, 4\]"):
        load_weights(net, other)
    partial = {"0.weight": torch.zeros(8, 4)}
    missing, unexpected = load_weights(net, {**partial, "extra": torch.zeros(1)})
    assert "0.bias" in missing and unexpected == ["extra"]
    with pytest.raises(CheckpointError, match="key-for-key"):
        load_weights(net, partial, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# a crafted pickle at every place that reads a checkpoint named in a config

LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``: the side effect that must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose unpickling would create ``marker``."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1, "callbacks": Payload(marker)}, path)
    return path


def _vq_config(ckpt_path: Path, target: str = "ldm.models.autoencoder.VQModelInterface", **params) -> dict:
    cfg = tiny_first_stage_config()
    cfg["target"] = target
    cfg["params"].update(ckpt_path=str(ckpt_path), **params)
    return cfg


@pytest.mark.parametrize(
    "entry",
    [
        "LatentDiffusion.ckpt_path",
        "DDPM.ckpt_path",
        "first_stage_config.ckpt_path",
        "VQModel.ckpt_path",
        "VQModelInterface.ckpt_path",
    ],
)
def test_crafted_pickle_is_refused_by_every_init_checkpoint(entry, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    if entry == "LatentDiffusion.ckpt_path":
        cfg = {"target": LDM_TARGET, "params": tiny_ldm_params(ckpt_path=str(evil))}
    elif entry == "DDPM.ckpt_path":
        params = {k: v for k, v in tiny_ldm_params(ckpt_path=str(evil)).items() if "stage" not in k}
        cfg = {"target": "ldm.models.diffusion.ddpm.DDPM", "params": params}
    elif entry == "first_stage_config.ckpt_path":
        cfg = {"target": LDM_TARGET, "params": tiny_ldm_params(first_stage_config=_vq_config(evil))}
    else:
        cfg = _vq_config(evil, target=f"ldm.models.autoencoder.{entry.split('.')[0]}")
    with pytest.raises(UnsafeCheckpointError, match=r"would import/run \['builtins\.exec'\] when unpickled; refused") as err:
        instantiate_from_config(cfg)
    assert "--unsafe-load" in str(err.value) and str(evil) in str(err.value)
    assert not marker.exists()


def test_crafted_pickle_as_perceptual_backbone_weights_is_refused(tmp_path):
    from ldm.modules.lpips import build_lpips

    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "squeezenet1_1.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec"):
        build_lpips("squeeze", pretrained=True, backbone_path=evil)
    assert not marker.exists()


def test_the_payload_is_live_when_the_user_opts_in(tmp_path):
    """The crafted file of these tests really runs code when unpickled without restriction (so refusals are real)."""
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="no key in common"):
        instantiate_from_config(_vq_config(evil, unsafe_load=True))
    assert marker.read_text() == "pwned"


def test_refine_loading_refuses_a_state_dict_with_a_non_string_key(tmp_path):
    from ldm.refine.loading import load_expert

    torch.save({"state_dict": {3: torch.zeros(1)}, "config": {}}, tmp_path / "intkey.ckpt")
    with pytest.raises(CheckpointError, match=r"maps '3' \(int\) to a Tensor; a state dict maps parameter names"):
        load_expert(tmp_path / "intkey.ckpt")


@pytest.mark.parametrize("unsafe", [False, True])
def test_a_compressed_record_is_refused_before_it_is_inflated(tmp_path, unsafe):
    """torch.save stores records as they are; a deflated record (1 MB of zeros declaring 1 GiB) was inflated in full by
    torch.load before any check.  Here 4 MiB of zeros in 4 KB."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1 << 20)}}, buffer)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(bomb, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            compressed = info.filename.endswith("/data/0")
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    assert bomb.stat().st_size < 64 * 1024
    with pytest.raises(CheckpointError, match=r"record '.*data/0' is compressed \(4,194,304 bytes from [\d,]+\); torch"):
        load_checkpoint(bomb, unsafe=unsafe)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(buffer.getvalue())
    assert load_checkpoint(plain)["state_dict"]["w"].shape == (1 << 20,)
