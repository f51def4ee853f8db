"""Reliability and security (issue 8): what test_main / test_refine* / test_imageio / test_checkpoint leave out.

* a crafted pickle is refused at every place that reads a checkpoint named in a config (model and first-stage
  ``ckpt_path``, directly, through ``main.py -t`` overrides, through the refine CLI), without its side effect;
* configs stored in checkpoints: only classes defined in the allow-list are built, also for the sub-configs that an
  allowed class builds itself, and such a config cannot switch the safe loader off; ``--trust-config`` accepts;
* ``main.py`` bad inputs (unknown targets, bad init checkpoints, unresolvable overrides), each one line and a non-zero
  exit, fuzzing of its override parsing;
* refine's output folder without write permission.

Faults injected into training runs and atomic writes are in ``test_reliability_faults.py``.
"""

from __future__ import annotations

import builtins
import errno
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image
from test_main import QUICKSTART, TEST_OVERLAY, _load_main_module

import ldm.util
from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_checkpoint
from ldm.models.diffusion.latesteps import LateStepsLatentDiffusion
from ldm.refine import Refiner
from ldm.train.cli import merge_configs, parse_cli
from ldm.util import TRUSTED_TARGET_PREFIXES, ConfigError, instantiate_from_config

from conftest import load_photos, tiny_expert_config, tiny_first_stage_config, tiny_ldm_params

REPO = Path(__file__).resolve().parents[1]
REFINE_SCRIPT = REPO / "scripts" / "refine.py"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``: the side effect that must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class TrustedExpert(LateStepsLatentDiffusion):
    """A model class outside the allow-list (it lives in a test module): built only with --trust-config."""


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose unpickling would create ``marker``."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1, "callbacks": Payload(marker)}, path)
    return path


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_error_line(text: str, prefix: str) -> str:
    lines = [line for line in error_lines(text) if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def overlay(folder: Path, text: str = TEST_OVERLAY, name: str = "tiny_overlay.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def main_module():
    return _load_main_module()


@pytest.fixture(scope="module")
def refine_cli():
    spec = importlib.util.spec_from_file_location("refine_script_reliability", REFINE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_refine(cli, argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one_image")
    Image.fromarray(load_photos()[0][::12, ::12][:32, :40]).save(folder / "astro.png")
    return folder


def refine_args(checkpoints, outdir: Path) -> list[str]:
    args = [a for path in checkpoints for a in ("--ckpt", str(path))]
    return [*args, "--outdir", str(outdir), "--start-t", "300", "--ddim-steps", "10", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------------------------------
# a crafted pickle at every checkpoint entry point


def _vq_config(ckpt_path: Path, target: str = "ldm.models.autoencoder.VQModelInterface", **params) -> dict:
    cfg = tiny_first_stage_config()
    cfg["target"] = target
    cfg["params"].update(ckpt_path=str(ckpt_path), **params)
    return cfg


@pytest.mark.parametrize(
    "entry", ["LatentDiffusion.ckpt_path", "DDPM.ckpt_path", "first_stage_config.ckpt_path", "VQModel.ckpt_path",
              "VQModelInterface.ckpt_path"],
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


@pytest.mark.parametrize("key", ["model.params.ckpt_path", "model.params.first_stage_config.params.ckpt_path"])
def test_crafted_pickle_given_through_a_main_py_override_is_refused(main_module, key, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    argv = ["-b", str(QUICKSTART), str(overlay(tmp_path)), "-t", "-l", str(tmp_path / "logs"), f"{key}={evil}"]
    assert main_module.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert "builtins.exec" in line and "refused" in line and "--unsafe-load" in line
    assert not marker.exists()
    assert not (tmp_path / "logs").exists()


def test_crafted_pickle_given_to_the_refine_cli_is_refused(refine_cli, one_image, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_refine(refine_cli, ["--input", str(one_image), *refine_args([evil], out)]) == 2
    line = one_error_line(capsys.readouterr().err, "refine.py: error:")
    assert "builtins.exec" in line and "--unsafe-load" in line
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# configs stored in checkpoints


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
        instantiate_from_config(cfg, allowed_prefixes=TRUSTED_TARGET_PREFIXES)
    assert f"target={target!r}" in str(err.value) and "--trust-config" in str(err.value)
    assert not marker.exists()
    if target == "ldm.util.atomic_write_bytes":  # why functions are refused although their module is allowed
        instantiate_from_config({"target": target, "params": params})
        assert marker.read_bytes() == b"pwned"


def test_sub_configs_that_an_allowed_class_reads_itself_are_checked_too(tmp_path):
    """VQRoundTrip reads a YAML config named by its ``first_stage`` argument and builds it: the allow-list of the
    checkpoint's config still applies there."""
    marker = tmp_path / "pwned"
    yaml_path = tmp_path / "first_stage.yaml"
    OmegaConf.save(OmegaConf.create({"target": "os.system", "params": {"command": f"touch {marker}"}}), yaml_path)
    cfg = {"target": "ldm.eval.degrade.VQRoundTrip", "params": {"first_stage": str(yaml_path)}}
    with pytest.raises(ConfigError, match=r"target='os\.system' is not in the allow-list"):
        instantiate_from_config(cfg, allowed_prefixes=TRUSTED_TARGET_PREFIXES)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="lacks"):  # a trusted config runs the command (then fails: not a VQ model)
        instantiate_from_config(cfg)
    assert marker.exists()
    assert ldm.util.untrusted_config_prefixes() is None  # the scope ends with the call, also after an error


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


# ---------------------------------------------------------------------------------------------------------------------
# main.py: bad configs and init checkpoints, one line each


UNKNOWN_TARGETS = {
    "model": ("model:\n  target: ldm.models.nope.LatentDiffusion\n",
              "target='ldm.models.nope.LatentDiffusion': module 'ldm.models.nope' cannot be imported"),
    "unet": ("model:\n  params:\n    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModl\n",
             "has no attribute 'UNetModl' (did you mean 'UNetModel'?)"),
    "not-dotted": ("model:\n  target: LatentDiffusion\n", "target='LatentDiffusion' is not a dotted import path"),
    "data": ("data:\n  params:\n    train:\n      target: ldm.data.embedded.EmbeddedPhotoz\n",
             "has no attribute 'EmbeddedPhotoz' (did you mean 'EmbeddedPhotos'?)"),
    "callback": ("lightning:\n  callbacks:\n    mine:\n      target: ldm.train.callbacks.ImageLoger\n",
                 "has no attribute 'ImageLoger' (did you mean 'ImageLogger'?)"),
}


@pytest.mark.parametrize("where", sorted(UNKNOWN_TARGETS))
def test_yaml_with_an_unknown_target_fails_in_one_line(main_module, where, tmp_path, capsys):
    text, expected = UNKNOWN_TARGETS[where]
    bad = overlay(tmp_path, text, name="bad.yaml")
    logs = tmp_path / "logs"
    assert main_module.main(["-b", str(QUICKSTART), str(overlay(tmp_path)), str(bad), "-t", "-l", str(logs)]) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert expected in line
    assert not logs.exists() or list(logs.iterdir()) == []  # no run folder left behind (the callback is built last)


@pytest.fixture(scope="module")
def bad_init_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Files given as ``model.params.ckpt_path`` of the quickstart config, each wrong in one way."""
    root = tmp_path_factory.mktemp("bad_init")
    model_cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART).model, resolve=True)
    model_cfg.pop("base_learning_rate")
    model_cfg["params"]["first_stage_config"]["params"]["ckpt_path"] = None
    model_cfg["params"]["unet_config"]["params"]["model_channels"] = 64
    wider = instantiate_from_config(model_cfg)
    save_checkpoint({"state_dict": wider.state_dict()}, root / "wider_unet.ckpt")
    vq = instantiate_from_config(model_cfg["params"]["first_stage_config"])
    save_checkpoint({"state_dict": vq.state_dict()}, root / "first_stage.ckpt")
    data = (root / "wider_unet.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "empty.ckpt").write_bytes(b"")
    (root / "notes.ckpt").write_text("not a checkpoint\n")
    (root / "folder.ckpt").mkdir()
    return {p.stem: p for p in root.iterdir()}


@pytest.mark.parametrize(
    "name, code, expected",
    [
        ("truncated", 1, "cannot be read (truncated or corrupt)"),
        ("empty", 1, "is empty (0 bytes)"),
        ("notes", 1, "cannot be read"),
        ("folder", 2, "is a directory, not a checkpoint file"),
        ("first_stage", 1, "weights of LateStepsLatentDiffusion (no key in common): it is the wrong kind of checkpoint"),
        ("wider_unet", 1, "model.diffusion_model.input_blocks.0.0.weight: checkpoint [64, 3, 3, 3] vs model [32, 3, 3, 3]"),
    ],
)
def test_bad_init_checkpoint_fails_in_one_line(main_module, bad_init_checkpoints, name, code, expected, tmp_path, capsys):
    path = bad_init_checkpoints[name]
    argv = ["-b", str(QUICKSTART), str(overlay(tmp_path)), "-t", "-l", str(tmp_path / "logs"),
            f"model.params.ckpt_path={path}"]
    assert main_module.main(argv) == code
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert expected in line and str(path) in line
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.params.t_min=${nope}", "cannot resolve the config at model.params.t_min: Interpolation key 'nope' not found"),
        ("model.params=3", "params of 'ldm.models.diffusion.latesteps.LateStepsLatentDiffusion' must be a mapping"),
        ("model.params.unet_config.params.channel_mult=[1", "cannot parse the override"),
        ("model.params.unet_config.params.channel_mult.0={a: 1}", "cannot build 'ldm.modules.diffusionmodules.openaimodel"),
        ("model.params.unet_config.params.channel_mult={a: 1}", "cannot apply the override"),
        ("model.params.unet_config={a: 1}", "config for 'ldm.modules.diffusionmodules.openaimodel.UNetModel' has unknown keys"),
    ],
)
def test_unusable_overrides_fail_in_one_line(main_module, override, expected, tmp_path, capsys):
    argv = ["-b", str(QUICKSTART), str(overlay(tmp_path)), "-t", "-l", str(tmp_path / "logs"), override]
    assert main_module.main(argv) == 2
    assert expected in one_error_line(capsys.readouterr().err, "main.py: error:")


def test_list_entries_are_overridden_by_index():
    merged = merge_configs([QUICKSTART], ["model.params.unet_config.params.channel_mult.1=4", "model.params.use_ema=false"])
    assert list(merged.model.params.unet_config.params.channel_mult) == [1, 4]
    assert merged.model.params.use_ema is False


OVERRIDE_KEYS = st.sampled_from([
    "model.params.t_min", "model.params", "model", "model.target", "lightning.trainer.max_steps", "data.params.batch_size",
    "model.params.unet_config.params.channel_mult.0", "model.params.unet_config.params.channel_mult.-1",
    "model.params.unet_config.params.channel_mult.9", "lightning.callbacks.x.target", "model.params.first_stage_config",
    "a..b", ".x", "lightning.trainer.gpus",
])
OVERRIDE_VALUES = st.one_of(st.text(max_size=8), st.sampled_from(
    ["${nope}", "${model.params.t_max}", "[1,2", "{a: 1}", "null", "???", "'", "!!python/object:os.system", "1e309", "[]"]
))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.one_of(st.builds("{}={}".format, OVERRIDE_KEYS, OVERRIDE_VALUES), st.text(max_size=12)),
                       max_size=3))
def test_fuzzed_main_py_overrides_merge_or_fail_with_a_config_error(tokens):
    try:
        opt, dotlist = parse_cli(["-b", str(QUICKSTART), "-t", *tokens])
        merged = merge_configs(opt.base, dotlist)
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
        return
    OmegaConf.to_container(merged, resolve=True)  # what main.py does next: must not fail any more


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["-l"], "argument -l/--logdir: expected one argument"),
        (["-s", "abc"], "argument -s/--seed: invalid int value: 'abc'"),
        (["--scale_lr", "maybe"], "expected a boolean (true/false), got 'maybe'"),
    ],
)
def test_flags_without_a_valid_value_fail_in_one_line(main_module, tokens, expected, capsys):
    assert main_module.main(["-b", str(QUICKSTART), "-t", *tokens]) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and expected in one_error_line(err, "main.py: error:")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_for_diffusion_training(main_module, precision, tmp_path, capsys):
    argv = ["-b", str(QUICKSTART), str(overlay(tmp_path)), "-t", "-l", str(tmp_path / "logs"),
            f"lightning.trainer.precision={precision}"]
    assert main_module.main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert f"precision={precision}" in line and "EMA" in line and "use precision=bf16-mixed" in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# refine: permission errors on the output folder


def test_refine_output_folder_without_write_permission(refine_cli, expert_checkpoints, one_image, tmp_path, capsys,
                                                       monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(refine_cli.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    capsys.readouterr()
    assert run_refine(refine_cli, ["--input", str(one_image), *refine_args(expert_checkpoints, locked / "out")]) == 3
    line = one_error_line(capsys.readouterr().err, "refine.py: error:")
    assert str(locked / "out") in line and "permission denied" in line
    assert list(locked.iterdir()) == []


def test_refine_permission_denied_while_writing_is_one_line(refine_cli, expert_checkpoints, one_image, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "out"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == out:  # what a folder made read-only during the run gives a non-root user
            raise PermissionError(errno.EACCES, "Permission denied", str(out / ".x.png.abcdefgh.tmp"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    capsys.readouterr()
    assert run_refine(refine_cli, ["--input", str(one_image), *refine_args(expert_checkpoints, out)]) == 3
    lines = error_lines(capsys.readouterr().err)
    (line,) = [line for line in lines if "permission denied" in line]
    assert str(out / "astro_t300_s0.png") in line
    assert list(out.iterdir()) == []
