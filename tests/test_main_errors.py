"""main.py's bad inputs: each is one line and a non-zero exit, with no run folder left behind.

* a crafted pickle given as an init checkpoint through an override is refused without its side effect;
* unknown targets, bad init checkpoints, unresolvable or mistyped overrides, flags without a valid value, true half
  precision;
* bad Trainer values, seeds out of range, a data folder of corrupt images, crafted configs and command lines;
* Ctrl+C while main.py starts or after the run folder is made: ``main.py: interrupted``, exit 130.

Most cases run ``main.main`` in process (fast); Ctrl+C while starting and one end-to-end error run in subprocesses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_checkpoint import crafted_checkpoint
from test_main import MAIN, QUICKSTART, TEST_OVERLAY, _env, _load_main_module

from ldm.checkpoint import save_checkpoint
from ldm.util import instantiate_from_config

from warm_python import run_python

STARTUP_TIMEOUT = 600


@pytest.fixture(scope="module")
def main_module():
    return _load_main_module()


def overlay(folder: Path, text: str = TEST_OVERLAY, name: str = "tiny_overlay.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def new_run_args(folder: Path, *extra: str) -> list[str]:
    return ["-b", str(QUICKSTART), str(overlay(folder)), "-t", "-l", str(folder / "logs"), *extra]


def nothing_left(logs: Path) -> bool:
    return not logs.exists() or not any(logs.iterdir())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_error_line(text: str, prefix: str) -> str:
    lines = [line for line in error_lines(text) if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# a crafted pickle as an init checkpoint


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


# ---------------------------------------------------------------------------------------------------------------------
# main.py: bad configs and init checkpoints, one line each


UNKNOWN_TARGETS = {
    "model": (
        "model:\n  target: ldm.models.nope.LatentDiffusion\n",
        "target='ldm.models.nope.LatentDiffusion': module 'ldm.models.nope' cannot be imported",
    ),
    "unet": (
        "model:\n  params:\n    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModl\n",
        "has no attribute 'UNetModl' (did you mean 'UNetModel'?)",
    ),
    "not-dotted": ("model:\n  target: LatentDiffusion\n", "target='LatentDiffusion' is not a dotted import path"),
    "data": (
        "data:\n  params:\n    train:\n      target: ldm.data.embedded.EmbeddedPhotoz\n",
        "has no attribute 'EmbeddedPhotoz' (did you mean 'EmbeddedPhotos'?)",
    ),
    "callback": (
        "lightning:\n  callbacks:\n    mine:\n      target: ldm.train.callbacks.ImageLoger\n",
        "has no attribute 'ImageLoger' (did you mean 'ImageLogger'?)",
    ),
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
    argv = ["-b", str(QUICKSTART), str(overlay(tmp_path)), "-t", "-l", str(tmp_path / "logs"), f"model.params.ckpt_path={path}"]
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
    argv = [
        "-b",
        str(QUICKSTART),
        str(overlay(tmp_path)),
        "-t",
        "-l",
        str(tmp_path / "logs"),
        f"lightning.trainer.precision={precision}",
    ]
    assert main_module.main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert f"precision={precision}" in line and "EMA" in line and "use precision=bf16-mixed" in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# one line, exit 2, no run folder


def model_only_config(folder: Path) -> Path:
    """The quickstart's model and trainer settings without its data section (to give another one)."""
    config = OmegaConf.merge(OmegaConf.load(QUICKSTART), OmegaConf.load(overlay(folder)))
    del config["data"]
    path = folder / "model_only.yaml"
    OmegaConf.save(config, path)
    return path


def corrupt_image_data(folder: Path) -> Path:
    images = folder / "images"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * i)
    path = folder / "corrupt_data.yaml"
    path.write_text(
        "data:\n  target: ldm.data.datamodule.DataModuleFromConfig\n  params:\n    batch_size: 2\n    train:\n"
        "      target: ldm.data.image_folder.ImageFolderDataset\n"
        f"      params: {{root: {images}, size: 32, split: all, val_fraction: 0}}\n"
    )
    return path


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["lightning.trainer.max_steps=-5"], "lightning.trainer: `max_steps` must be a non-negative integer or -1"),
        (["lightning.trainer.max_epochs=-7"], "lightning.trainer: `max_epochs` must be a non-negative integer or -1"),
        (["-s", "99999999999999"], "argument -s/--seed: 99999999999999 is outside the seed range [0, 4294967295]"),
        (["-s", "-1"], "argument -s/--seed: -1 is outside the seed range [0, 4294967295]"),
        (["-s", "4294967296"], "is outside the seed range"),
    ],
)
def test_bad_trainer_values_and_seeds_are_one_line_without_a_run_folder(main_module, extra, expected, tmp_path, capsys):
    assert main_module.main(new_run_args(tmp_path, *extra)) == 2
    assert expected in one_error_line(capsys.readouterr().err, "main.py: error:")
    assert nothing_left(tmp_path / "logs")


def test_a_data_folder_of_corrupt_images_is_one_line_without_a_run_folder(main_module, tmp_path, capsys):
    argv = ["-b", str(model_only_config(tmp_path)), str(corrupt_image_data(tmp_path)), "-t", "-l", str(tmp_path / "logs")]
    assert main_module.main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert f"all 5 image(s) of split 'all' under {str(tmp_path / 'images')!r} are unreadable" in line
    assert nothing_left(tmp_path / "logs")


def test_a_bad_trainer_value_from_the_command_line_in_a_subprocess(tmp_path):
    argv = [MAIN, *new_run_args(tmp_path, "lightning.trainer.max_steps=-5")]
    result = run_python(argv, cwd=tmp_path, env=_env(), timeout=STARTUP_TIMEOUT)
    assert result.returncode == 2
    assert "max_steps" in one_error_line(result.stderr, "main.py: error:")
    assert nothing_left(tmp_path / "logs")


# ---------------------------------------------------------------------------------------------------------------------
# crafted configs and command lines: one line, exit 2, no run folder


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model=5"], "'model' must be a mapping {target: pkg.Class, params: {...}}, got 5"),
        (["data=5"], "'data' must be a mapping {target: pkg.Class, params: {...}}, got 5"),
        (["model=null"], "'model' must be a mapping {target: pkg.Class, params: {...}}, got None"),  # was a traceback
        # targets that build something else failed mid-fit, after the run folder was made
        (["lightning.callbacks.x.target=os.getcwd"], "lightning.callbacks.x: target 'os.getcwd' built a str, not a"),
        (["lightning.logger.target=os.getcwd"], "lightning.logger: target 'os.getcwd' built a str, not a"),
        (["~model.params", "model.target=torch.nn.Identity"], "model: target 'torch.nn.Identity' built a Identity, not a"),
        (["lightning.modelcheckpoint.params.dirpath=elsewhere"], "dirpath='elsewhere': checkpoints always go to the run's"),
        (["data=null"], "training needs a 'data' section"),
        (["model.params.unet_config.params.model_channels=-5"], "cannot build the model of this config: Trying to create"),
        (["model.params.unet_config.params.num_head_channels=0"], "cannot build the model of this config: integer div"),
        (["lightning.trainer.max_steps=1e400"], "lightning.trainer.max_steps=inf must be int"),
        (["lightning.trainer.max_steps=abc"], "lightning.trainer.max_steps='abc' must be int"),
        (["lightning.trainer.max_steps=2.5"], "lightning.trainer.max_steps=2.5 must be int"),
        (["lightning.trainer.max_steps=true"], "lightning.trainer.max_steps=True must be int"),
        (["lightning.trainer.limit_train_batches=.nan"], "limit_train_batches=nan must be float or int or null"),
        (["lightning.trainer.accumulate_grad_batches=0"], "lightning.trainer.accumulate_grad_batches=0 must be >= 1"),
        (["lightning.trainer.check_val_every_n_epoch=0"], "lightning.trainer.check_val_every_n_epoch=0 must be >= 1"),
        (["lightning.trainer.val_check_interval=0"], "lightning.trainer.val_check_interval=0 must be > 0"),
        (["lightning.callbacks.image_logger.params.batch_frequency=0"], "lightning.callbacks.image_logger: "),
        (["lightning.logger.target=pytorch_lightning.loggers.WandbLogger"], "lightning: Requirement 'wandb"),
        (["lightning.trainer.devices=0"], "lightning.trainer: `Trainer(devices=0)` value is not a valid input"),
        (["lightning.trainer.strategy=nonsense"], "lightning.trainer: You selected an invalid strategy name"),
        (["lightning.modelcheckpoint=abc"], "lightning.modelcheckpoint must be {target: ..., params: {...}}, got 'abc'"),
        (["model.base_learning_rate=abc"], "model.base_learning_rate='abc' must be a finite number >= 0"),
        (["model.base_learning_rate=-1"], "model.base_learning_rate=-1 must be a finite number >= 0"),
        (["model.base_learning_rate=.nan"], "model.base_learning_rate=nan must be a finite number >= 0"),
        (["-n", "a/b"], "-n/--name 'a/b' must be a plain file name (no '/')"),
        (["-p", "/../../escaped"], "-p/--postfix '/../../escaped' must be a plain file name"),
        (["data.params.train.params.size=4096"], "size=4096 px is above 2048 px"),
        # ~key deletions and target changes on the command line
        (["~model"], "the merged config has no 'model' section"),
        (["~data"], "training needs a 'data' section"),
        (["~data.params.train"], "training (-t) needs data.params.train, a dataset config"),
        (["~data.params.nope"], "cannot delete 'data.params.nope' (~data.params.nope): data.params has no key 'nope'"),
        (
            ["~data.params.batch_size.x"],
            "cannot delete 'data.params.batch_size.x' (~data.params.batch_size.x): data.params.batch_size is a value",
        ),
        (["~data.params.train=1"], "a deletion is ~key alone (no '='); to set a key write key=value"),
        (["~"], "a deletion names a key"),
        (
            ["data.params.train.target=ldm.data.cached_latents.CachedLatents"],
            "CachedLatents needs the argument(s) 'root'",
        ),
        (
            ["data.params.train.target=ldm.data.cached_latents.CachedLatents", "data.params.train.params.size=32"],
            "ldm.data.cached_latents.CachedLatents takes no argument 'size'",
        ),
    ],
)
def test_crafted_configs_are_one_line_without_a_run_folder(main_module, extra, expected, tmp_path, capsys):
    assert main_module.main(new_run_args(tmp_path, *extra)) == 2
    assert expected in one_error_line(capsys.readouterr().err, "main.py: error:")
    assert nothing_left(tmp_path / "logs") and not (tmp_path / "escaped").exists()


def test_ctrl_c_before_training_is_one_line_and_leaves_no_run_folder(main_module, tmp_path, monkeypatch, capsys):
    import ldm.train.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm.train.trainer, "build_trainer", interrupted)  # after the run folder is made and locked
    try:
        code = main_module.main(new_run_args(tmp_path))
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("main() let KeyboardInterrupt escape")
    assert code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "main.py: interrupted" and "Traceback" not in err
    assert nothing_left(tmp_path / "logs")


def test_ctrl_c_while_main_py_starts_is_one_line(tmp_path):
    """SIGINT while main.py imports Lightning and builds the model: no traceback, exit 130."""
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *new_run_args(tmp_path)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(1.0)  # inside the imports (they take seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=STARTUP_TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "main.py: interrupted" and "Traceback" not in err
    assert nothing_left(tmp_path / "logs")


def test_a_value_training_cannot_use_stops_it_in_one_line(main_module, tmp_path, capsys):
    """Met only once training runs (a crop the UNet cannot halve: 36 px -> a 9 x 9 latent), it was a traceback."""
    extra = ["data.params.train.params.size=36", "~data.params.validation"]
    assert main_module.main(new_run_args(tmp_path, *extra)) == 1
    err = capsys.readouterr().err
    line = one_error_line(err, "main.py: error: training stopped:")
    assert "must be divisible by" in line and "(raised at openaimodel.py:" in line and "resume with -r" in line
    assert "Traceback" not in err
    # a crop smaller than the first layers' kernels: torch's RuntimeError was a traceback
    extra = ["data.params.train.params.size=3", "~data.params.validation"]
    assert main_module.main(new_run_args(tmp_path, *extra)) == 1
    line = one_error_line(capsys.readouterr().err, "main.py: error: training stopped:")
    assert "Kernel size can't be greater than actual input size (raised at conv.py:" in line


@pytest.fixture()
def tiny_run(main_module, tmp_path) -> Path:
    assert main_module.main(new_run_args(tmp_path, "-n", "run")) == 0
    (run,) = (tmp_path / "logs").iterdir()
    return run


@pytest.mark.parametrize(
    "override, before, after",
    [("model.base_learning_rate=0.5", "2e-05", "0.5"), ("data.params.batch_size=2", "4", "2"),
     ("model.params.ema_decay=0.5", "0.999", "0.5")],
)  # fmt: skip
def test_a_resume_override_that_the_checkpoint_would_undo_is_refused(main_module, tiny_run, capsys, override, before,
                                                                     after):  # fmt: skip
    """Lightning restored the optimizer's rate and the EMA decay over the override, and the data position (in batches)
    moved with another batch size, while the run's configs and later checkpoints named the new values."""
    last = tiny_run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    capsys.readouterr()
    assert main_module.main(["-r", str(tiny_run), "-t", "lightning.trainer.max_steps=4", override]) == 2
    key = override.split("=")[0]
    one_error_line(capsys.readouterr().err, f"main.py: error: cannot resume with {key} changed ({before} -> {after}): ")
    assert last.read_bytes() == saved


def test_a_resume_whose_configs_build_another_network_blames_the_override(main_module, tiny_run, capsys):
    """The checkpoint is intact; the message said it was damaged."""
    last = tiny_run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    capsys.readouterr()
    args = ["-r", str(tiny_run), "-t", "lightning.trainer.max_steps=4", "model.params.unet_config.params.model_channels=64"]
    assert main_module.main(args) == 2
    line = one_error_line(capsys.readouterr().err, f"main.py: error: cannot resume from {last}: its weights do not fit")
    assert "size mismatch" in line and "an override or a -b config changed the network" in line
    assert last.read_bytes() == saved


def test_a_damaged_last_ckpt_is_one_line_and_left_as_it_was(main_module, tiny_run, capsys):
    """Garbage in the Lightning state of ``last.ckpt`` (loops, optimizer, callbacks, no ``state_dict``) was Lightning's
    traceback from its checkpoint connector; the file stays as it was."""
    import hashlib

    import torch

    run = tiny_run
    last = run / "checkpoints" / "last.ckpt"
    original = torch.load(last, map_location="cpu", weights_only=True)
    damages = {"loops": "garbage", "optimizer_states": [{"state": {}}], "callbacks": "garbage", "state_dict": None}
    for key, value in damages.items():
        damaged = dict(original, **{key: value})
        if value is None:
            del damaged[key]
        torch.save(damaged, last)
        digest = hashlib.sha256(last.read_bytes()).hexdigest()
        capsys.readouterr()
        assert main_module.main(["-r", str(run), "-t", "lightning.trainer.max_steps=4"]) == 1, key
        line = one_error_line(capsys.readouterr().err, f"main.py: error: cannot resume from {last}: Lightning cannot")
        assert "it is damaged or was not written by main.py" in line, line
        assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("text, expected", [("5\n", "not a single value"), ('"just a string"\n', "not a single value"),
                                            ("- a\n", "not a list")])  # fmt: skip
def test_a_yaml_whose_root_is_not_a_mapping_is_one_line(main_module, tmp_path, capsys, text, expected):
    """A number was OmegaConf's OSError traceback; a lone string became the key 'just a string'."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main_module.main(["-b", str(QUICKSTART), str(bad), "-t", "-l", str(tmp_path / "logs")]) == 2
    line = one_error_line(capsys.readouterr().err, "main.py: error:")
    assert f"config {str(bad)!r} must be a mapping with keys ['model', 'data', 'lightning'], {expected}" in line
    assert nothing_left(tmp_path / "logs")
