"""ldm.refine.shipped: the safetensors export of an expert, its header records, and short names of shipped weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoint import MAX_METADATA_JSON, CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from ldm.models.diffusion.latesteps import LateStepsLatentDiffusion
from ldm.refine import Refiner, shipped
from ldm.refine.loading import load_expert
from ldm.refine.shipped import SHIPPED, ShippedWeights, expand_names, export_expert, shipped_files

from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(expert_checkpoints, tmp_path_factory):
    """Both tiny experts exported in fp32 and fp16."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = [root / f"{dtype}_{p.stem}.safetensors" for p in expert_checkpoints]
        for src, dst in zip(expert_checkpoints, out[dtype]):
            export_expert(src, dst, dtype=dtype)
    return out


def test_an_fp32_export_refines_bit_for_bit_like_its_checkpoint(expert_checkpoints, exported, crops32):
    x = crops32[:2]
    reference = Refiner.from_checkpoints(expert_checkpoints, device="cpu").refine_tensors(x, start_t=400, seeds=[3, 4])
    again = Refiner.from_checkpoints(exported["fp32"], device="cpu").refine_tensors(x, start_t=400, seeds=[3, 4])
    assert torch.equal(reference, again)
    half = Refiner.from_checkpoints(exported["fp16"], device="cpu").refine_tensors(x, start_t=400, seeds=[3, 4])
    mixed = [exported["fp16"][0], expert_checkpoints[1]]  # an export chains with its sibling's checkpoint
    assert Refiner.from_checkpoints(mixed, device="cpu").refine_tensors(x, start_t=400, seeds=[3, 4]).shape == x.shape
    assert half.dtype == torch.float32 and (half - reference).abs().max() < 0.05  # parameters rounded to fp16


def test_an_export_keeps_window_step_and_ema_and_drops_the_training_state(expert_checkpoints, exported):
    source = load_checkpoint(expert_checkpoints[1])
    ckpt = load_checkpoint(exported["fp16"][1])
    assert ckpt["window"] == [0, 250] and ckpt["ema_folded"] is True and ckpt["global_step"] == 0
    assert ckpt["metadata"]["source_sha256"] == sha256_file(expert_checkpoints[1])
    assert not any(k.startswith("model_ema.") for k in ckpt["state_dict"])
    params = ckpt["config"]["model"]["params"]
    assert params["use_ema"] is False and "ckpt_path" not in params
    assert params["first_stage_config"]["params"]["lossconfig"] == {"target": "torch.nn.Identity"}
    unet = ckpt["state_dict"]["model.diffusion_model.out.2.weight"]
    assert unet.dtype == torch.float16
    assert ckpt["state_dict"]["alphas_cumprod"].dtype == source["state_dict"]["alphas_cumprod"].dtype  # buffers as-is
    first = next(k for k in ckpt["state_dict"] if k.startswith("first_stage_model.") and k.endswith(".weight"))
    assert ckpt["state_dict"][first].dtype == torch.float32  # as trained: exports chain with their siblings
    ema = source["state_dict"]["model_ema.diffusion_modelout2weight"]
    assert torch.equal(unet, ema.half())  # the EMA weights, not the training weights
    expert, info = load_expert(exported["fp16"][1])
    assert info.ema is True and info.window == (0, 250) and expert.window == (0, 250)


def test_an_export_is_byte_reproducible(expert_checkpoints, tmp_path):
    """safetensors writes header metadata in hash-map order; the export sorts it, so a documented command gives the
    documented sha256."""
    for name in ("x.safetensors", "y.safetensors"):
        export_expert(expert_checkpoints[0], tmp_path / name)
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


def test_an_export_without_ema_weights_says_so_and_loads_the_training_weights(tmp_path, caplog):
    from conftest import build_tiny_expert, save_expert_checkpoint

    model = build_tiny_expert(0, 250, seed=5)
    src = tmp_path / "plain.ckpt"
    save_expert_checkpoint(model, src)
    ckpt = load_checkpoint(src)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model_ema.")}
    save_checkpoint(ckpt, src)
    export_expert(src, tmp_path / "plain.safetensors", dtype="fp32")
    assert load_checkpoint(tmp_path / "plain.safetensors")["ema_folded"] is False
    _, info = load_expert(tmp_path / "plain.safetensors")
    assert info.ema is False and "no EMA weights in the checkpoint" in caplog.text


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"latesteps.config": "{not json"}, "its 'latesteps.config' metadata is not valid JSON"),
        ({"latesteps.window": "[" * 100000 + "]" * 100000}, "its 'latesteps.window' metadata is not valid JSON"),
        ({"latesteps.config": "x" * (MAX_METADATA_JSON + 1)}, f"over the limit of {MAX_METADATA_JSON}"),
    ],
)
def test_bad_header_records_are_refused_in_one_line(tmp_path, metadata, message):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="bad.safetensors") as err:
        load_checkpoint(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "record, value, message",
    [
        ("window", "[250.9, 500.2]", "must be [t_min, t_max] (two integers)"),
        ("window", '{"250": 1, "500": 2}', "must be [t_min, t_max] (two integers)"),
        ("window", json.dumps(list(range(100000))), "must be [t_min, t_max] (two integers)"),
        ("global_step", "true", "must be an integer >= 0 or null"),
        ("global_step", "-5", "must be an integer >= 0 or null"),
        ("ema_folded", '"yes"', "must be true or false"),
        ("config", "[1]", "must be a JSON object"),
    ],
)
def test_header_records_of_the_wrong_kind_are_refused_in_one_bounded_line(tmp_path, record, value, message):
    from safetensors.torch import save_file

    path = tmp_path / "crafted.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={f"latesteps.{record}": value})
    with pytest.raises(CheckpointError, match="crafted.safetensors") as err:
        load_checkpoint(path)
    assert message in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize(
    "params, where",
    [
        ([1], "model.params"),
        (5, "model.params"),
        ("ab", "model.params"),
        ({"first_stage_config": {"params": [1]}}, "model.params.first_stage_config.params"),
    ],
)
def test_a_crafted_config_whose_params_are_not_a_mapping_is_a_config_error(exported, tmp_path, params, where):
    from ldm.util import ConfigError

    ckpt = load_checkpoint(exported["fp16"][0])
    ckpt["config"] = {"model": {"target": ckpt["config"]["model"]["target"], "params": params}}
    save_checkpoint(ckpt, tmp_path / "c.safetensors")
    with pytest.raises(ConfigError, match=f"c.safetensors: its config's {where} must be a mapping of arguments"):
        load_expert(tmp_path / "c.safetensors")


def test_a_foreign_safetensors_file_without_records_still_loads_as_tensors(tmp_path):
    from safetensors.torch import save_file

    # other tools' metadata, even under the names of this project's records, is not read as records
    save_file({"w": torch.ones(3)}, str(tmp_path / "w.safetensors"), metadata={"format": "pt", "config": "x=1"})
    ckpt = load_checkpoint(tmp_path / "w.safetensors")
    assert set(ckpt) == {"state_dict", "metadata"} and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))


@pytest.fixture
def fake_shipped(monkeypatch, tmp_path, exported):
    """A registry entry "tiny" over the fp16 exports, in a weights folder of its own."""
    root = tmp_path / "weights"
    (root / "tiny").mkdir(parents=True)
    files = []
    for path in exported["fp16"]:
        target = root / "tiny" / path.name
        target.write_bytes(path.read_bytes())
        files.append((f"tiny/{path.name}", sha256_file(target)))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", root)
    monkeypatch.setitem(SHIPPED, "tiny", ShippedWeights("tiny", tuple(files), "two tiny experts"))
    return root


def test_a_short_name_expands_to_its_checked_files(fake_shipped, tmp_path, monkeypatch, crops32):
    monkeypatch.chdir(tmp_path)
    files = expand_names(["tiny"])
    assert [Path(p).parent for p in files] == [fake_shipped / "tiny"] * 2
    assert expand_names(["a.ckpt", "tiny"])[0] == "a.ckpt"
    refiner = Refiner.from_checkpoints("tiny", device="cpu")
    assert [e.window for e in refiner.experts] == [(250, 500), (0, 250)]
    # a path of that name wins (with a warning): ./tiny means the file or folder
    (tmp_path / "tiny").mkdir()
    assert expand_names(["tiny"]) == ["tiny"]


def test_a_missing_or_damaged_shipped_file_is_refused_before_loading(fake_shipped):
    target = fake_shipped / SHIPPED["tiny"].files[1][0]
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match=r"is damaged: its sha256 is .*restore it with: git checkout --"):
        shipped_files("tiny")
    target.unlink()
    with pytest.raises(CheckpointError, match="the 'tiny' weights are not in this installation"):
        Refiner.from_checkpoints("tiny", device="cpu")
    with pytest.raises(CheckpointError, match="no shipped weights are called 'nope'; known: "):
        shipped_files("nope")


def test_the_shipped_demo_weights_are_in_the_repository_and_match_their_digests():
    files = shipped_files("demo")  # raises on a missing or changed file
    assert sum(os.path.getsize(p) for p in files) <= 25 * 2**20  # at most 25 MB in all, so the repository stays small
    infos = [load_expert(p)[1] for p in files]
    assert [i.window for i in infos] == [(250, 500), (0, 250)] and all(i.ema for i in infos)


def run_export(*args: str) -> subprocess.CompletedProcess:
    return run_python([REPO / "scripts" / "export_weights.py", *args], cwd=REPO, timeout=300)


def test_export_cli_writes_once_and_refuses_bad_requests_in_one_line(expert_checkpoints, tmp_path):
    out = tmp_path / "e.safetensors"
    proc = run_export("--ckpt", str(expert_checkpoints[0]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "window t in [250, 500), step 0, EMA weights" in proc.stdout and "as fp16" in proc.stdout
    before = out.read_bytes()
    cases = [
        (["--ckpt", str(expert_checkpoints[0]), "--out", str(out)], "already exists; choose a new path"),
        (["--ckpt", str(expert_checkpoints[0]), "--out", str(tmp_path / "e.ckpt")], "ending with .safetensors"),
        (["--ckpt", str(expert_checkpoints[0]), "--out", str(tmp_path / ".safetensors")], "ending with .safetensors"),
        (
            ["--ckpt", str(expert_checkpoints[0]), "--out", str(tmp_path / "x" / ".." / "e2.safetensors")],
            "x/.. does not exist; choose an existing folder",
        ),
        (["--ckpt", str(expert_checkpoints[0]), "--out", str(out / "e3.safetensors")], "e.safetensors is a file, not a folder"),
        (["--ckpt", str(expert_checkpoints[0]), "--out", str(tmp_path / "no" / "e.safetensors")], "does not exist"),
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "m.safetensors")], "does not exist"),
        (
            ["--ckpt", str(expert_checkpoints[0]), "--out", str(tmp_path / "d.safetensors"), "--dtype", "int8"],
            "invalid choice: 'int8'",
        ),
    ]
    for args, message in cases:
        proc = run_export(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before and not (tmp_path / "m.safetensors").exists() and not (tmp_path / "x").exists()
    vq = tmp_path / "vq.ckpt"  # a checkpoint that is not an expert
    save_checkpoint({"state_dict": {"encoder.w": torch.zeros(1)}, "config": {"model": {"target": "x.Y"}}}, vq)
    proc = run_export("--ckpt", str(vq), "--out", str(tmp_path / "v.safetensors"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "v.safetensors").exists()
    assert json.loads(json.dumps(load_checkpoint(out)["window"])) == [250, 500]


def test_refine_cli_takes_the_demo_name_and_keeps_pixels_outside_the_box(tmp_path, crops32):
    from PIL import Image

    from ldm.imageio import tensor_to_image

    Image.fromarray(tensor_to_image(crops32[0])).save(tmp_path / "a.png")
    argv = [REPO / "scripts" / "refine.py", "--input", tmp_path / "a.png", "--box", "8,8,24,24", "--start-t", "150"]
    argv += ["--ckpt", "demo", "--outdir", tmp_path / "out", "--device", "cpu"]
    proc = run_python(argv, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = (tmp_path / "out").glob("a_t150_s0*.png")
    before, after = (np.asarray(Image.open(p).convert("RGB")) for p in (tmp_path / "a.png", out))
    outside = np.ones((32, 32), dtype=bool)
    outside[8:24, 8:24] = False
    assert np.array_equal(before[outside], after[outside]) and not np.array_equal(before, after)


def test_export_weights_tells_an_input_it_cannot_load_from_an_output_it_cannot_write(tmp_path, monkeypatch, capsys):
    """A converted SD checkpoint whose CLIP folder is gone was "cannot write <out>", exit 3 (an output problem)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_weights_script", REPO / "scripts" / "export_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--ckpt", str(tmp_path / "sd.ckpt"), "--out", str(tmp_path / "e.safetensors")]
    for error, code, words in [
        (FileNotFoundError("FrozenCLIPEmbedder(version='clip'): not a local folder"), 2, "error: FrozenCLIPEmbedder("),
        (PermissionError(13, "Permission denied", str(tmp_path / "e.safetensors")), 3, "error: cannot write"),
    ]:

        def failing(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(shipped, "export_expert", failing)
        assert script.main(argv) == code
        assert words in capsys.readouterr().err


def test_a_checkpoint_without_a_config_is_refused_with_the_exporters_own_words(expert_checkpoints, tmp_path):
    """load_expert ran first and said "pass the matching YAML with --config", a flag export_weights.py lacks."""
    bare = tmp_path / "bare.ckpt"
    save_checkpoint({"state_dict": load_checkpoint(expert_checkpoints[0])["state_dict"]}, bare)
    with pytest.raises(CheckpointError, match="holds no model config; only checkpoints written by main.py"):
        export_expert(bare, tmp_path / "e.safetensors")


class ForeignLDM(LateStepsLatentDiffusion):
    """A model class outside the allow-list (it lives in a test module)."""


def test_a_config_outside_the_allow_list_exports_only_when_trusted(expert_checkpoints, tmp_path):
    """export_weights.py's refusal advised --trust-config, a flag it lacked; it has it now (and export_expert the
    keyword), and a trusted export loads again only when trusted."""
    from ldm.util import ConfigError

    ckpt = load_checkpoint(expert_checkpoints[0])
    ckpt["config"]["model"]["target"] = f"{__name__}.ForeignLDM"
    foreign = tmp_path / "foreign.ckpt"
    save_checkpoint(ckpt, foreign)
    with pytest.raises(ConfigError, match="allow-list.*--trust-config"):
        export_expert(foreign, tmp_path / "e.safetensors")
    export_expert(foreign, tmp_path / "e.safetensors", trust_config=True)
    expert, _ = load_expert(tmp_path / "e.safetensors", trust_config=True)
    assert type(expert.model) is ForeignLDM
    assert "--trust-config" in run_export("--help").stdout
