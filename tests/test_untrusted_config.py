"""A config stored in a checkpoint is untrusted: every slot builds only its kind of class, values
have the types of the constructor that receives them, and every size is compared with the checkpoint's state dict on
the meta device before anything real is allocated (:mod:`ldm.untrusted`).

* sizes that do not fit the checkpoint (4096 channels, a million blocks, 2**24 timesteps) are refused in one line
  with exit 2, fast, under an address-space cap of 2 GiB above the process' size after its imports;
* absurd values (2**36, negative, bools or floats for integers, NaN) are one ConfigError line, never a traceback;
* a class of the project that is not of its slot's kind (a dataset, a callback, a data module, another network) is
  refused naming the slot, the target and what the slot accepts, and is never built; a dataset never scans its folder;
* a valid checkpoint loads and refines exactly as before; ``--trust-config`` still builds any class;
* the allow-list: only classes defined in it are built, and no class that builds sub-configs of its own (from files);
  a config cannot switch the safe loader off for a file it names, nor pass an argument its constructor lacks; a foreign
  target through the CLI is refused, and accepted with ``--trust-config``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_checkpoint import LDM_TARGET, _vq_config, crafted_checkpoint

import ldm.data.image_folder
import ldm.untrusted
from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldm.models.diffusion.latesteps import LateStepsLatentDiffusion
from ldm.refine import Refiner
from ldm.refine.loading import _inference_config, load_expert, load_yaml_model_config
from ldm.untrusted import check_untrusted_config, check_untrusted_model
from ldm.util import TRUSTED_TARGET_PREFIXES, ConfigError, get_obj_from_str, instantiate_from_config

from conftest import load_photos, photo_crops, tiny_expert_config, tiny_first_stage_config, tiny_ldm_params

REPO = Path(__file__).resolve().parents[1]
REFINE_SCRIPT = REPO / "scripts" / "refine.py"
UNET = ("model", "params", "unet_config", "params")
FIRST = ("model", "params", "first_stage_config", "params")
MODEL = ("model", "params")


def expert_with(src: Path, dst: Path, edit) -> Path:
    """``src``'s weights with its embedded config changed by ``edit(config)``."""
    ckpt = load_checkpoint(src)
    cfg = tiny_expert_config(250, 500)
    edit(cfg)
    ckpt["config"] = cfg
    save_checkpoint(ckpt, dst)
    return dst


def setter(where: tuple[str, ...], key: str, value):
    def edit(cfg: dict) -> None:
        node = cfg
        for part in where:
            node = node[part]
        node[key] = value

    return edit


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_image")
    Image.fromarray(load_photos()[0][::12, ::12][:32, :40]).save(folder / "astro.png")
    return folder


@pytest.fixture(scope="module")
def refine_cli():
    spec = importlib.util.spec_from_file_location("refine_script_untrusted", REFINE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# sizes: refused before anything is allocated

CAPPED_REFINE = textwrap.dedent(
    """
    import contextlib, importlib.util, io, json, resource, sys, time
    spec = importlib.util.spec_from_file_location("refine_cli", sys.argv[1])
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    import ldm.refine, ldm.refine.batch  # what main() imports, before the cap
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 2**30, resource.RLIM_INFINITY))
    for ckpt in sys.argv[4:]:
        err = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["--input", sys.argv[2], "--outdir", sys.argv[3], "--ckpt", ckpt, "--device", "cpu"])
        print(json.dumps({"rc": rc, "seconds": time.perf_counter() - started, "stderr": err.getvalue()}), flush=True)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process size from /proc")
def test_sizes_beyond_the_checkpoint_are_refused_fast_under_a_memory_cap(expert_checkpoints, one_image, tmp_path):
    """Without the dry run, 4096 channels allocate ~60 GB, a million ResBlocks more, and 2**24 timesteps 2 GB of
    schedule: each fails the 2 GiB cap with a traceback (or the OOM killer without a cap)."""
    cases = {
        "channels": expert_with(expert_checkpoints[0], tmp_path / "channels.ckpt", setter(UNET, "model_channels", 4096)),
        "blocks": expert_with(expert_checkpoints[0], tmp_path / "blocks.ckpt", setter(UNET, "num_res_blocks", 2**20)),
        "timesteps": expert_with(expert_checkpoints[0], tmp_path / "timesteps.ckpt", setter(MODEL, "timesteps", 2**24)),
    }
    script = tmp_path / "capped_refine.py"
    script.write_text(CAPPED_REFINE)
    out = tmp_path / "out"
    argv = [sys.executable, str(script), str(REFINE_SCRIPT), str(one_image), str(out), *map(str, cases.values())]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(zip(cases, map(json.loads, proc.stdout.splitlines())))
    expected = {
        "channels": "model.diffusion_model.time_embed.0.weight: checkpoint [128, 32] vs model [16384, 4096]",
        "blocks": "its config's model registers more than",
        "timesteps": "holds a noise schedule of 1000 timesteps (betas), its config asks for 16777216",
    }
    for name, result in results.items():
        lines = result["stderr"].splitlines()
        assert result["rc"] == 2 and len(lines) == 1, result
        assert lines[0].startswith("refine.py: error: config and checkpoint disagree") and expected[name] in lines[0]
        assert f"{name}.ckpt" in lines[0]
        assert result["seconds"] < 30, result
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# values: one line, never a traceback


@pytest.mark.parametrize(
    "where, key, value, expected",
    [
        (UNET, "model_channels", 2**36, f"model_channels=68719476736: out of range: an integer here must lie in [0, {2**24}]"),
        (UNET, "model_channels", -5, "unet_config.params.model_channels=-5: out of range"),
        (UNET, "model_channels", True, "model_channels=True: expected an integer, got bool"),
        (UNET, "model_channels", 32.0, "model_channels=32.0: expected an integer, got float"),
        (UNET, "channel_mult", [1, 2**36], "channel_mult=[1, 68719476736]: item 1 (68719476736): out of range"),
        (UNET, "num_head_channels", -2, "num_head_channels=-2: out of range: an integer here must lie in [-1,"),
        (
            UNET,
            "num_head_channels",
            0,
            "cannot build 'ldm.models.diffusion.latesteps.LateStepsLatentDiffusion' from its config: ZeroDivisionError",
        ),
        (FIRST, "n_embed", 2**40, "first_stage_config.params.n_embed=1099511627776: out of range"),
        (MODEL, "timesteps", 2**36, "model.params.timesteps=68719476736: out of range"),
        (MODEL, "timesteps", False, "model.params.timesteps=False: expected an integer, got bool"),
        (MODEL, "linear_end", float("nan"), "model.params.linear_end=nan: expected a finite number"),
    ],
)
def test_absurd_values_are_one_config_error_line(expert_checkpoints, tmp_path, where, key, value, expected):
    path = expert_with(expert_checkpoints[0], tmp_path / "absurd.ckpt", setter(where, key, value))
    with pytest.raises(ConfigError) as err:
        load_expert(path)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(f"checkpoint {path}: ")


def test_absurd_values_inside_the_first_stage_ddconfig(expert_checkpoints, tmp_path):
    """``ddconfig`` is a plain mapping for VQModel: its entries are checked against Encoder's and Decoder's hints."""
    edit = setter((*FIRST, "ddconfig"), "ch_mult", [1, -2, 2])
    path = expert_with(expert_checkpoints[0], tmp_path / "ddconfig.ckpt", edit)
    with pytest.raises(ConfigError, match=r"first_stage_config\.params\.ddconfig\.ch_mult=\[1, -2, 2\]: item 1 \(-2\): out of"):
        load_expert(path)


def crafted_structure(shape: str):
    """A config value that a recursive walk cannot handle: a nest deeper than the recursion limit, a cycle, or a list
    holding itself twice at each of 22 levels (4 M paths; the pickle stays tiny)."""
    if shape == "deep":
        value: object = {}
        for _ in range(3000):
            value = {"a": value}
    elif shape == "cycle":
        value = {}
        value["a"] = value
    else:
        value = [0]
        for _ in range(22):
            value = [value, value]
    return value


@pytest.mark.parametrize("shape", ["deep", "cycle", "shared"])
def test_a_crafted_config_structure_is_one_line(expert_checkpoints, tmp_path, shape):
    """Without the check: RecursionError tracebacks (copy.deepcopy, the target scan), or seconds of walking 4 M paths."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling the nest needs it; loading must not
    try:
        path = expert_with(expert_checkpoints[0], tmp_path / "crafted.ckpt", setter(MODEL, "monitor", crafted_structure(shape)))
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ConfigError, match="its stored config nests deeper than 64 levels or holds more than 100,000"):
        load_expert(path)


# ---------------------------------------------------------------------------------------------------------------------
# roles: each slot builds only its kind


def test_a_dataset_in_cond_stage_config_never_scans_its_folder(
    refine_cli, expert_checkpoints, one_image, tmp_path, monkeypatch, capsys
):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(load_photos()[1][:40, :40]).save(photos / "a.png")
    target = "ldm.data.image_folder.ImageFolderDataset"
    edit = setter(MODEL, "cond_stage_config", {"target": target, "params": {"root": str(photos), "split": "all"}})
    path = expert_with(expert_checkpoints[0], tmp_path / "dataset.ckpt", edit)
    scanned = []
    for name in ("walk", "scandir", "listdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, **k: scanned.append(a[:1]) or _real(*a, **k))
    monkeypatch.setattr(ldm.data.image_folder, "scan_image_files", lambda *a, **k: scanned.append(a) or [])
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["--input", str(one_image), "--ckpt", str(path), "--outdir", str(out), "--device", "cpu"]
    assert refine_cli.main(argv) == 2
    monkeypatch.undo()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"refine.py: error: checkpoint {path}: model.params.cond_stage_config accepts a conditioning encoder"
    )
    assert f"target={target!r} is a dataset" in lines[0] and "--trust-config" in lines[0]
    assert not [a for a in scanned if a and str(photos) in str(a[0])] and not out.exists()


WRONG_KINDS = [
    ("unet_config", "ldm.models.autoencoder.VQModelInterface", "another kind of model"),
    ("first_stage_config", "ldm.modules.diffusionmodules.openaimodel.UNetModel", "another kind of network module"),
    ("cond_stage_config", "ldm.train.callbacks.ImageLogger", "a Lightning callback"),
    ("cond_stage_config", "ldm.data.datamodule.DataModuleFromConfig", "a data module"),
    ("cond_stage_config", "ldm.modules.diffusionmodules.model.Encoder", "another kind of network module"),
    ("scheduler_config", "ldm.data.embedded.EmbeddedPhotos", "a dataset"),
    ("scheduler_config", "ldm.modules.ema.LitEma", "another kind of network module"),
]


@pytest.mark.parametrize("slot, target, kind", WRONG_KINDS)
def test_each_slot_builds_only_its_kind(expert_checkpoints, tmp_path, monkeypatch, slot, target, kind):
    built = []
    monkeypatch.setattr(get_obj_from_str(target), "__init__", lambda self, *a, **k: built.append(target))
    edit = setter(MODEL, slot, {"target": target, "params": {}})
    path = expert_with(expert_checkpoints[0], tmp_path / "wrong_kind.ckpt", edit)
    with pytest.raises(ConfigError) as err:
        load_expert(path)
    message = str(err.value)
    assert f"model.params.{slot} accepts " in message and f"target={target!r} is {kind}" in message, message
    assert "--trust-config" in message and "\n" not in message and not built


@pytest.mark.parametrize(
    "role, target, accepts",
    [
        ("model", "ldm.data.image_folder.ImageFolderDataset", "a latent diffusion model"),
        ("lossconfig", "ldm.modules.losses.VQLPIPSWithDiscriminator", "torch.nn.Identity (a model rebuilt"),
        ("unet_config", "ldm.lr_scheduler.LambdaLinearScheduler", "the project's UNet"),
    ],
)
def test_roles_of_the_config_checker(role, target, accepts):
    """The slots load_expert never reaches with a wrong kind (the model is refused earlier as "the wrong kind", the
    first stage's loss is replaced by torch.nn.Identity): the checker refuses them too."""
    with pytest.raises(ConfigError, match=re.escape(f"{role} accepts {accepts}")) as err:
        check_untrusted_config({"target": target, "params": {}}, role, where=role)
    assert f"target={target!r} is " in str(err.value)


def test_sentinels_identity_and_the_projects_encoders_fill_cond_stage_config():
    for cond in (
        "__is_first_stage__",
        "__is_unconditional__",
        {"target": "torch.nn.Identity"},
        {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"embed_dim": 8}},
        tiny_first_stage_config(),
    ):
        check_untrusted_config(cond, "cond_stage_config")
    with pytest.raises(ConfigError, match="'__is_conditional__' is not a config"):
        check_untrusted_config("__is_conditional__", "cond_stage_config")


def test_configs_outside_the_slots_and_files_are_refused(expert_checkpoints, tmp_path, monkeypatch):
    stray = {"target": "ldm.modules.ema.LitEma", "params": {}}
    path = expert_with(expert_checkpoints[0], tmp_path / "stray.ckpt", setter(UNET, "attention_resolutions", [stray]))
    with pytest.raises(
        ConfigError,
        match=r"unet_config\.params\.attention_resolutions holds a config "
        r"\(target='ldm\.modules\.ema\.LitEma'\), but 'attention_resolutions' is no slot",
    ):
        load_expert(path)
    remap = tmp_path / "used.npy"
    np.save(remap, np.arange(64))
    loaded = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    path = expert_with(expert_checkpoints[0], tmp_path / "remap.ckpt", setter(FIRST, "remap", str(remap)))
    with pytest.raises(ConfigError, match=r"first_stage_config\.params\.remap=.* names a file that VQModelInterface reads"):
        load_expert(path)
    assert not loaded


def test_weights_that_store_fewer_numbers_than_they_show_do_not_pass_the_size_check(expert_checkpoints, tmp_path):
    """Expanded (stride-0) tensors keep a file tiny while their shapes claim gigabytes: the size check counts the
    numbers the file stores, so a config with 4096 channels is refused before it is allocated."""
    cfg = tiny_expert_config(250, 500)
    setter(UNET, "model_channels", 4096)(cfg)
    with torch.device("meta"):
        meta = instantiate_from_config({**cfg["model"], "params": {**cfg["model"]["params"], "use_ema": False}})
    ckpt = load_checkpoint(expert_checkpoints[0])
    real = ckpt["state_dict"]
    ckpt["state_dict"] = {
        k: real[k] if k in real and real[k].shape == v.shape else torch.zeros(1, dtype=v.dtype).expand(v.shape)
        for k, v in meta.state_dict().items()
    }
    ckpt["config"] = cfg
    save_checkpoint(ckpt, tmp_path / "expanded.ckpt")
    assert (tmp_path / "expanded.ckpt").stat().st_size < 20e6
    with pytest.raises(CheckpointError, match=r"its config's model would hold [\d,]+ numbers, .* only [\d,]+; refused"):
        load_expert(tmp_path / "expanded.ckpt")


def test_a_schedule_longer_than_any_model_is_refused_before_it_is_computed(expert_checkpoints, tmp_path):
    ckpt = load_checkpoint(expert_checkpoints[0])
    steps = 200_000
    ckpt["state_dict"]["betas"] = torch.full((steps,), 0.01, dtype=ckpt["state_dict"]["betas"].dtype)
    cfg = tiny_expert_config(250, 500)
    cfg["model"]["params"].update(timesteps=steps, linear_start=0.01, linear_end=0.01)
    ckpt["config"] = cfg
    save_checkpoint(ckpt, tmp_path / "long.ckpt")
    with pytest.raises(ConfigError, match="a noise schedule of 200000 timesteps; at most 100,000"):
        load_expert(tmp_path / "long.ckpt")


@pytest.mark.parametrize("key", [7, ("a",), b"timesteps"])
def test_config_keys_that_are_not_strings_are_one_line(expert_checkpoints, tmp_path, key):
    path = expert_with(expert_checkpoints[0], tmp_path / "key.ckpt", setter(UNET, key, 2))
    with pytest.raises(ConfigError, match=r"its stored config has a key .* config keys are strings"):
        load_expert(path)


def test_cond_stage_forward_names_only_the_encoding_methods(expert_checkpoints, tmp_path):
    path = expert_with(
        expert_checkpoints[0], tmp_path / "hook.ckpt", setter(MODEL, "cond_stage_forward", "register_forward_hook")
    )
    with pytest.raises(ConfigError, match=r"cond_stage_forward='register_forward_hook': .* only the cond stage methods"):
        load_expert(path)


def test_a_package_missing_at_build_time_is_one_config_error(expert_checkpoints, monkeypatch):
    import ldm.refine.loading

    def missing(*args, **kwargs):
        raise ImportError("the text encoders need the 'transformers' package, which is not installed")

    monkeypatch.setattr(ldm.refine.loading, "instantiate_from_config", missing)
    with pytest.raises(ConfigError, match="cannot build .*'transformers' package"):
        load_expert(expert_checkpoints[0], trust_config=True)


# ---------------------------------------------------------------------------------------------------------------------
# what still works


def test_a_valid_checkpoint_loads_and_refines_exactly_as_when_trusted(expert_checkpoints):
    """The dry run leaves no trace: same weights, same random state, same refined bytes as the unchecked build."""
    checked = Refiner.from_checkpoints(expert_checkpoints, device="cpu")
    trusted = Refiner.from_checkpoints(expert_checkpoints, device="cpu", trust_config=True)
    for a, b in zip(checked.experts, trusted.experts):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(t.device.type == "cpu" for t in (*a.model.parameters(), *a.model.buffers()))
    x = photo_crops(2, 32, seed=3)
    assert torch.equal(
        checked.refine_tensors(x, 400, seeds=[1, 2], ddim_steps=10), trusted.refine_tensors(x, 400, seeds=[1, 2], ddim_steps=10)
    )
    ckpt = load_checkpoint(expert_checkpoints[0])
    state = torch.get_rng_state()
    check_untrusted_model(_inference_config(ckpt["config"]["model"], True), ckpt["state_dict"], "checkpoint")
    assert torch.equal(state, torch.get_rng_state())


def test_trust_config_still_builds_any_class(expert_checkpoints, tmp_path):
    """The user vouches for the file: a wrong-kind class (here a schedule slot holding an EMA, never built for
    inference) and the allow-list checks are skipped."""
    edit = setter(MODEL, "scheduler_config", {"target": "ldm.modules.ema.LitEma", "params": {}})
    path = expert_with(expert_checkpoints[0], tmp_path / "trusted.ckpt", edit)
    with pytest.raises(ConfigError, match="scheduler_config accepts a learning-rate schedule of ldm.lr_scheduler"):
        load_expert(path)
    expert, info = load_expert(path, trust_config=True)
    assert expert.model.scheduler_config["target"] == "ldm.modules.ema.LitEma" and info.window == (250, 500)


def test_the_project_configs_pass_the_checker():
    """Every model config this project ships fills its slots with the right kinds and values."""
    checked = []
    for yaml in sorted(REPO.glob("configs/**/*.yaml")):
        cfg = load_yaml_model_config(yaml)
        if "LatentDiffusion" in cfg["target"]:  # (the autoencoder configs are trained, never read from a checkpoint)
            check_untrusted_config(_inference_config(cfg, True))
            checked.append(yaml.name)
    assert len(checked) >= 5, checked
    check_untrusted_config(_inference_config(tiny_expert_config(0, 250)["model"], False))


def test_a_checkpoint_without_a_schedule_is_refused_before_building(expert_checkpoints, tmp_path):
    ckpt = load_checkpoint(expert_checkpoints[0])
    del ckpt["state_dict"]["betas"]
    save_checkpoint(ckpt, tmp_path / "no_betas.ckpt")
    with pytest.raises(CheckpointError, match=r"lacks the weights the model needs, starting with its noise schedule"):
        load_expert(tmp_path / "no_betas.ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# the allow-list: configs stored in checkpoints build only classes defined in it, also in the sub-configs an
# allowed class builds itself, and cannot switch the safe loader off; --trust-config accepts


class TrustedExpert(LateStepsLatentDiffusion):
    """A model class outside the allow-list (it lives in a test module): built only with --trust-config."""


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_error_line(text: str, prefix: str) -> str:
    lines = [line for line in error_lines(text) if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def run_refine(cli, argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


def refine_args(checkpoints, outdir: Path) -> list[str]:
    args = [a for path in checkpoints for a in ("--ckpt", str(path))]
    return [*args, "--outdir", str(outdir), "--start-t", "300", "--ddim-steps", "10", "--device", "cpu"]


def _rewrite_config(src: Path, dst: Path, model_cfg: dict) -> Path:
    ckpt = load_checkpoint(src)
    ckpt["config"] = {"model": model_cfg}
    save_checkpoint(ckpt, dst)
    return dst


def test_a_checkpoint_config_cannot_switch_the_safe_loader_off(expert_checkpoints, tmp_path):
    """A config may name a file (``ckpt_path``) but not ``unsafe_load: true`` for it, unless the user trusts it."""
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "aux.ckpt", marker)
    cfg = tiny_expert_config(250, 500)["model"]
    cfg["params"]["cond_stage_config"] = _vq_config(evil, unsafe_load=True)
    path = _rewrite_config(expert_checkpoints[0], tmp_path / "expert.ckpt", cfg)
    with pytest.raises(ValueError, match="asks to load it with full pickle") as err:  # refine re-raises as ConfigError
        Refiner.from_checkpoints([path], device="cpu")
    assert str(evil) in str(err.value) and "--trust-config" in str(err.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="no key in common"):  # trusted: the payload runs, then the weights fail
        Refiner.from_checkpoints([path], device="cpu", trust_config=True)
    assert marker.exists()


@pytest.mark.parametrize(
    "target, params, reason",
    [
        ("os.system", {"command": "touch {marker}"}, "is not in the allow-list"),
        ("ldm.util.atomic_write_bytes", {"path": "{marker}", "write": b"pwned"}, "is a function, not a class"),
        ("ldm.train.callbacks.Path", {}, "is pathlib.Path, which is defined outside the allow-list"),
        ("taming.modules.losses.lpips.LPIPS", {}, "downloads VGG weights from the internet"),
        ("torch.nn.IdentityMap", {}, "is not in the allow-list"),
    ],
)
def test_checkpoint_configs_build_only_classes_of_the_allow_list(target, params, reason, tmp_path):
    marker = tmp_path / "pwned"
    params = {k: (v.format(marker=marker) if isinstance(v, str) else v) for k, v in params.items()}
    cfg = {"target": LDM_TARGET, "params": tiny_ldm_params(cond_stage_config={"target": target, "params": params})}
    with pytest.raises(ConfigError, match=reason) as err:
        check_untrusted_config(cfg, allowed_prefixes=TRUSTED_TARGET_PREFIXES)
    assert f"target={target!r}" in str(err.value) and "--trust-config" in str(err.value)
    assert not marker.exists()
    if target == "ldm.util.atomic_write_bytes":  # why functions are refused although their module is allowed
        instantiate_from_config({"target": target, "params": params})
        assert marker.read_bytes() == b"pwned"


def test_classes_that_build_sub_configs_from_files_are_never_built_from_a_checkpoint_config(tmp_path):
    """VQRoundTrip reads a YAML config named by its ``first_stage`` argument and builds it: no slot of a checkpoint's
    config admits it, so the command in that YAML never runs (only a trusted config builds it)."""
    marker = tmp_path / "pwned"
    yaml_path = tmp_path / "first_stage.yaml"
    OmegaConf.save(OmegaConf.create({"target": "os.system", "params": {"command": f"touch {marker}"}}), yaml_path)
    nested = {"target": "ldm.eval.degrade.VQRoundTrip", "params": {"first_stage": str(yaml_path)}}
    cfg = {"target": LDM_TARGET, "params": tiny_ldm_params(cond_stage_config=nested)}
    with pytest.raises(ConfigError, match=r"cond_stage_config accepts .*target='ldm\.eval\.degrade\.VQRoundTrip'"):
        check_untrusted_config(cfg)
    with pytest.raises(ConfigError, match="model accepts a latent diffusion model"):
        check_untrusted_config(nested)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="lacks"):  # a trusted config runs the command (then fails: not a VQ model)
        instantiate_from_config(nested)
    assert marker.exists()


def test_checkpoint_config_arguments_are_checked_against_the_constructor_before_anything_is_built(
    expert_checkpoints, tmp_path, monkeypatch
):
    path = expert_with(expert_checkpoints[0], tmp_path / "typo.ckpt", lambda cfg: cfg["model"]["params"].update(timestepz=9))
    built = []
    monkeypatch.setattr(ldm.untrusted, "_build_on_meta", lambda *args: built.append(args))
    with pytest.raises(ConfigError, match=r"model: .*LateStepsLatentDiffusion takes no argument 'timestepz' \(did you mean"):
        load_expert(path)
    assert built == []


def test_foreign_target_in_a_checkpoint_config_via_the_cli(refine_cli, expert_checkpoints, one_image, tmp_path, capsys):
    cfg = tiny_expert_config(250, 500)["model"]
    cfg["target"] = f"{__name__}.TrustedExpert"
    foreign = _rewrite_config(expert_checkpoints[0], tmp_path / "foreign.ckpt", cfg)
    out = tmp_path / "out"
    argv = ["--input", str(one_image), *refine_args([foreign, expert_checkpoints[1]], out)]
    capsys.readouterr()
    assert run_refine(refine_cli, argv) == 2
    line = one_error_line(capsys.readouterr().err, "refine.py: error:")
    assert "foreign.ckpt" in line and f"target='{__name__}.TrustedExpert' is not in the allow-list" in line
    assert "--trust-config" in line and not out.exists()
    assert run_refine(refine_cli, [*argv, "--trust-config"]) == 0
    assert [p.name for p in out.iterdir()] == ["astro_t300_s0.png"]
