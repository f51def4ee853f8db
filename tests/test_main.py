"""main.py end to end (subprocesses, tiny late-steps config on CPU) and the pieces of ldm/train in process.  The
resumable, sharded data order (ldm/data/resumable.py) is tested in test_resumable.py."""

from __future__ import annotations

import builtins
import csv
import datetime
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ldm.checkpoint import UnsafeCheckpointError, load_checkpoint
from ldm.train.callbacks import FinalCheckpoint, ImageLogger
from ldm.train.cli import check_override_key, merge_configs, parse_cli
from ldm.train.trainer import SafeAtomicCheckpointIO, build_loggers
from ldm.util import ConfigError, instantiate_from_config

from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
QUICKSTART = REPO / "configs" / "quickstart" / "latesteps_500_750.yaml"
RUN_TIMEOUT = 600

# Tiny overlay on the quickstart config: random first stage, 16 training / 8 validation crops, a few steps.
TEST_OVERLAY = """
model:
  params:
    first_stage_config:
      params:
        ckpt_path: null
data:
  params:
    batch_size: 4
    train:
      params: {n_samples: 16}
    validation:
      params: {n_samples: 8}
lightning:
  trainer:
    max_steps: 3
    num_sanity_val_steps: 0
    val_check_interval: 1.0   # validation (and so the monitored top-k checkpoints) after every 4-batch epoch, as the
    check_val_every_n_epoch: 1  # fault tests expect; the quickstart configs validate every few hundred steps instead
    enable_progress_bar: false
    enable_model_summary: false
    log_every_n_steps: 1
  modelcheckpoint:
    params:
      every_n_train_steps: 1
  callbacks:
    image_logger:
      params:
        batch_frequency: 2
        max_images: 2
        log_images_kwargs: {ddim_steps: 10}
"""


def _env() -> dict[str, str]:
    """Environment of a main.py subprocess: no inherited run folder; one thread per process (the DDP test runs two
    processes on two cores, and idle OpenMP threads make tiny CPU ops orders of magnitude slower on a busy machine)."""
    env = dict(os.environ)
    env.pop("LATESTEPS_LOGDIR", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_main(args: list[str], cwd: Path, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``python main.py *args`` in ``cwd``; returns the completed process (text output)."""
    return run_python([MAIN, *args], cwd=cwd, env=_env(), timeout=timeout)


def write_overlay(folder: Path) -> Path:
    path = folder / "tiny_overlay.yaml"
    path.write_text(TEST_OVERLAY)
    return path


def base_args(folder: Path) -> list[str]:
    return ["-b", str(QUICKSTART), str(write_overlay(folder)), "-l", str(folder / "logs")]


def only_run_dir(logs: Path) -> Path:
    runs = [p for p in logs.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def train_losses(run: Path) -> dict[int, float]:
    """``{global step: train loss}`` from all CSV logs of a run (a resume adds a version)."""
    losses = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss_step"):
                losses[int(row["step"])] = float(row["train/loss_step"])
    return losses


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> dict:
    """One tiny training run of 3 steps, with dotlist overrides (window [300, 500) instead of the config's [250, 500))."""
    folder = tmp_path_factory.mktemp("main_run")
    start = time.perf_counter()
    result = run_main([*base_args(folder), "-t", "-n", "tiny", "model.params.t_min=300"], folder)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    return {"folder": folder, "run": only_run_dir(folder / "logs"), "result": result, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------------
# training run: layout, checkpoint contents, config round trip


def test_train_writes_the_log_dir_layout(trained_run):
    run = trained_run["run"]
    assert run.name.endswith("_tiny")
    projects = sorted((run / "configs").glob("*-project.yaml"))
    lightnings = sorted((run / "configs").glob("*-lightning.yaml"))
    assert len(projects) == 1 and len(lightnings) == 1
    assert projects[0].name.split("-project")[0] == lightnings[0].name.split("-lightning")[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list((run / "checkpoints").glob(".*.tmp"))
    images = sorted(p.name for p in (run / "images" / "train").glob("*.png"))
    # batch_frequency 2 with increase_log_steps false -> steps 2 only (log_first_step is off)
    assert {"inputs_gs-000002_e-000000_b-000001.png", "window_refined_gs-000002_e-000000_b-000001.png"} <= set(images)
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    assert "Setting learning rate to 8.00e-05 = 1 (accumulate_grad_batches) * 1 (devices)" in trained_run["result"].stdout


def test_checkpoint_holds_config_window_and_loads_with_weights_only(trained_run):
    path = trained_run["run"] / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3  # lightning.trainer.max_steps from the overlay
    assert checkpoint["window"] == [300, 500]  # model.params.t_min=300 from the command line
    config = checkpoint["config"]
    assert set(config) == {"model", "data"}
    assert config["model"]["params"]["t_min"] == 300
    assert config["model"]["target"] == "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    assert len(checkpoint["optimizer_states"]) == 1


def test_saved_project_config_round_trips_and_rebuilds_the_model(trained_run):
    run = trained_run["run"]
    (project,) = (run / "configs").glob("*-project.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(project), resolve=True)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved == checkpoint["config"]
    merged = OmegaConf.to_container(
        merge_configs([QUICKSTART, write_overlay(trained_run["folder"])], ["model.params.t_min=300"]), resolve=True
    )
    assert saved["model"] == merged["model"] and saved["data"] == merged["data"]
    model_cfg = dict(saved["model"])
    model_cfg.pop("base_learning_rate")
    model = instantiate_from_config(model_cfg)
    result = model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    (lightning,) = (run / "configs").glob("*-lightning.yaml")
    assert OmegaConf.load(lightning).lightning.trainer.max_steps == 3


# ---------------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_resume_from_logdir_and_from_checkpoint_continues_at_the_saved_step(trained_run, tmp_path):
    run = tmp_path / "logs" / trained_run["run"].name
    shutil.copytree(trained_run["run"], run)
    first = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=5"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Restored all states from the checkpoint" in first.stdout + first.stderr
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 5
    assert checkpoint["window"] == [300, 500]  # the saved configs (with the earlier override) were restored
    adam = checkpoint["optimizer_states"][0]["state"][0]
    assert int(adam["step"]) == 5  # optimizer state continued, not restarted
    ema_before = load_checkpoint(trained_run["run"] / "checkpoints" / "last.ckpt")["state_dict"]["model_ema.num_updates"]
    assert int(checkpoint["state_dict"]["model_ema.num_updates"]) > int(ema_before)  # EMA continued, not re-initialised
    assert sorted(train_losses(run)) == [0, 1, 2, 3, 4]  # steps 0-2 before, 3-4 after the resume
    assert len(list((run / "configs").glob("*-project.yaml"))) >= 1
    assert len(list((tmp_path / "logs").iterdir())) == 1  # no new run folder

    second = run_main(["-t", "-r", str(run / "checkpoints" / "last.ckpt"), "lightning.trainer.max_steps=6"], tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert sorted(train_losses(run)) == [0, 1, 2, 3, 4, 5]

    # max_steps off the save cadence (saves at step 8, ends at 9): last.ckpt must still hold the final step
    off = ["lightning.trainer.max_steps=9", "lightning.modelcheckpoint.params.every_n_train_steps=2"]
    third = run_main(["-t", "-r", str(run), *off], tmp_path)
    assert third.returncode == 0, third.stderr[-4000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 9

    # a key deleted at one resume stays deleted at the next (every saved YAML merged over the defaults brought it back)
    fourth = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=10", "~lightning.callbacks.learning_rate_logger"],
                      tmp_path)  # fmt: skip
    assert fourth.returncode == 0, fourth.stderr[-4000:]
    time.sleep(1.1)  # the next save gets a newer timestamp
    fifth = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=11"], tmp_path)
    assert fifth.returncode == 0, fifth.stderr[-4000:]
    newest = sorted((run / "configs").glob("*-lightning.yaml"))[-1]
    callbacks = OmegaConf.load(newest).lightning.callbacks
    assert "learning_rate_logger" not in callbacks and "image_logger" in callbacks


def test_resume_with_another_noise_schedule_is_refused_in_one_line(trained_run, tmp_path):
    """Lightning restored the checkpoint's betas over the override, and the run saved checkpoints whose config named
    the new schedule: refine then refused them ("noise schedule differs")."""
    run = tmp_path / "logs" / trained_run["run"].name
    shutil.copytree(trained_run["run"], run)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    result = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=5", "model.params.linear_end=0.03"], tmp_path)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "main.py: error: resume checkpoint: noise schedule differs from this model's (betas:" in result.stderr
    assert "Traceback" not in result.stderr and (run / "checkpoints" / "last.ckpt").read_bytes() == before
    configs = sorted(p.name for p in (run / "configs").iterdir())
    again = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=4"], tmp_path)  # the refused override is not kept
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(sorted((run / "configs").iterdir())) == len(configs) + 2  # the accepted resume saved its pair


def test_a_run_folder_whose_lightning_yaml_latent_diffusion_wrote_resumes(trained_run, tmp_path):
    """latent-diffusion saves only what its configs set (a modelcheckpoint without a target, no callbacks): resuming
    from its newest pair alone, without the defaults, refused it ("lightning.modelcheckpoint must be {target: ...")."""
    run = tmp_path / "logs" / trained_run["run"].name
    shutil.copytree(trained_run["run"], run)
    (saved,) = sorted((run / "configs").glob("*-lightning.yaml"))
    lightning = OmegaConf.load(saved)
    del lightning.lightning.modelcheckpoint["target"], lightning.lightning["callbacks"]
    OmegaConf.save(lightning, saved)
    (run / "configs" / "notes.yaml").write_text("x: 1\n")  # merged by latent-diffusion; said to be left out here
    result = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "not merged: notes.yaml (pass extra configs with -b)" in result.stderr
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4


def _final_save(tmp_path: Path, every: int) -> dict:
    """Train 7 steps over epochs of 10 batches, ``last.ckpt`` saved every ``every`` steps (plus FinalCheckpoint)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    folder = tmp_path / f"every{every}"
    saver = ModelCheckpoint(
        dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=every, enable_version_counter=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FinalCheckpoint(), saver],
    )
    writes = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path, *a, **k: (writes.append(trainer.global_step), save(path, *a, **k))
    trainer.fit(Model(), DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=1))
    return {"writes": writes, **load_checkpoint(folder / "last.ckpt")}


def test_final_save_off_the_cadence_equals_a_save_on_it(tmp_path):
    """max_steps=7 saved every 5 steps: last.ckpt holds step 7, in the loop state a save on the cadence (every 7) has
    (mid-epoch, so a resume continues with batch 8 of epoch 0), written once; on the cadence nothing is added."""
    off, on = _final_save(tmp_path, every=5), _final_save(tmp_path, every=7)
    assert off["global_step"] == on["global_step"] == 7 and off["epoch"] == on["epoch"] == 0
    assert off["loops"] == on["loops"]
    assert off["writes"] == [5, 7] and on["writes"] == [7]


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    """Killed (SIGKILL) mid-run and resumed with -r, the final weights equal those of a run that was never killed."""
    args = [*base_args(tmp_path), "-t", "lightning.trainer.max_steps=6"]
    args.append("lightning.callbacks.image_logger.params.batch_frequency=1")
    full = run_main([*args, "-n", "full"], tmp_path)
    assert full.returncode == 0, full.stderr[-4000:]
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *args, "-n", "killed"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_run = None
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        marks = list((tmp_path / "logs").glob("*_killed/images/train/inputs_gs-000003_*.png"))
        if marks:
            killed_run = marks[0].parents[2]
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert killed_run is not None, "the run ended before step 3"
    for path in (killed_run / "checkpoints").glob("*.ckpt"):  # never a partial .ckpt: writes go through hidden temps
        assert load_checkpoint(path)["global_step"] >= 1
    saved_step = load_checkpoint(killed_run / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= saved_step <= 3
    resumed = run_main(["-t", "-r", str(killed_run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert not list((killed_run / "checkpoints").glob(".*.tmp"))
    a = load_checkpoint(only_run(tmp_path, "full") / "checkpoints" / "last.ckpt")
    b = load_checkpoint(killed_run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert train_losses(only_run(tmp_path, "full")) == train_losses(killed_run)
    for key in a["state_dict"]:  # weights, EMA (updated in optimizer_step, before checkpoints) and buffers
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(b["optimizer_states"][0]["state"][0]["exp_avg"])


def only_run(folder: Path, name: str) -> Path:
    (run,) = (folder / "logs").glob(f"*_{name}")
    return run


# ---------------------------------------------------------------------------------------------------------------------
# signals


def test_sigterm_during_training_writes_last_ckpt_and_exits_zero(tmp_path):
    args = [
        *base_args(tmp_path),
        "-t",
        "-n",
        "term",
        "lightning.trainer.max_steps=10000",
        "lightning.callbacks.image_logger.params.batch_frequency=1",
        "lightning.modelcheckpoint.params.every_n_train_steps=1000",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if list((tmp_path / "logs").glob("*_term/images/train/inputs_gs-000002_*.png")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, stderr[-4000:]
    run = only_run(tmp_path, "term")
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert 2 <= checkpoint["global_step"] < 1000
    assert f"SIGTERM: wrote {run / 'checkpoints' / 'last.ckpt'} at global step {checkpoint['global_step']}" in stdout
    assert checkpoint["window"] == [250, 500] and "config" in checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# security: a crafted checkpoint passed to -r


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_given_to_resume_is_refused(trained_run, tmp_path):
    run = tmp_path / "logs" / trained_run["run"].name
    shutil.copytree(trained_run["run"], run)
    marker = tmp_path / "pwned.txt"
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "payload": _Exploit(marker)}, last)
    for target in (str(run), str(last)):
        result = run_main(["-t", "-r", target], tmp_path)
        assert result.returncode == 1, result.stderr[-4000:]
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("main.py: error:")]
        assert len(error_lines) == 1 and "builtins.exec" in error_lines[0] and "--unsafe-load" in error_lines[0]
        assert not marker.exists()


def test_checkpoint_io_is_atomic_and_refuses_pickled_code(tmp_path):
    io = SafeAtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 7}, tmp_path / "ckpts" / "a.ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["a.ckpt"]
    assert io.load_checkpoint(tmp_path / "ckpts" / "a.ckpt")["global_step"] == 7
    marker = tmp_path / "pwned.txt"
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        io.load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    io.remove_checkpoint(tmp_path / "ckpts" / "a.ckpt")
    assert not (tmp_path / "ckpts" / "a.ckpt").exists()


def test_unsafe_flag_is_the_explicit_opt_in_for_other_pickles(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "made": datetime.date(2024, 1, 1)}, tmp_path / "trusted.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="datetime.date"):
        SafeAtomicCheckpointIO().load_checkpoint(tmp_path / "trusted.ckpt")
    assert SafeAtomicCheckpointIO(unsafe=True).load_checkpoint(tmp_path / "trusted.ckpt")["made"].year == 2024
    main = _load_main_module()
    model_cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART).model, resolve=True)
    main._set_unsafe_load(model_cfg)
    assert model_cfg["params"]["unsafe_load"] is True  # LatentDiffusion: ckpt_path (init)
    assert model_cfg["params"]["first_stage_config"]["params"]["unsafe_load"] is True  # VQModelInterface: ckpt_path
    assert "unsafe_load" not in model_cfg["params"]["unet_config"]["params"]  # UNetModel takes no such argument


# ---------------------------------------------------------------------------------------------------------------------
# run folders


def test_run_names_fresh_log_dirs_and_resume_dropping_init_checkpoints(tmp_path):
    main = _load_main_module()
    opt = SimpleNamespace(name="", base=["configs/x/latesteps_500_750.yaml"], postfix="-lr2")
    assert main._run_name(opt, "2024-01-01T00-00-00") == "2024-01-01T00-00-00_latesteps_500_750-lr2"
    opt.name = "mine"
    assert main._run_name(opt, "T") == "T_mine-lr2"
    first = main._claim_new_logdir(str(tmp_path / "logs"), "T_mine")
    second = main._claim_new_logdir(str(tmp_path / "logs"), "T_mine")
    assert (first.name, second.name) == ("T_mine", "T_mine_2") and first.is_dir() and second.is_dir()
    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "latesteps_750_1000.yaml").model, resolve=True)
    dropped = main._drop_init_checkpoints(model_cfg, "model")
    assert dropped == [
        "model.params.ckpt_path=models/latesteps/latesteps_500_750.ckpt",
        "model.params.first_stage_config.params.ckpt_path=models/first_stage_models/vq-f4/model.ckpt",
    ]
    main._check_init_checkpoints(model_cfg, "model")  # nothing left to find


def test_loggers_csv_always_and_the_configured_one_gets_the_run_folder(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    plain = build_loggers(OmegaConf.create({}), str(tmp_path))
    assert isinstance(plain[0], CSVLogger) and plain[0].save_dir == str(tmp_path)
    custom = OmegaConf.create({"logger": {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"name": "mine"}}})
    (only,) = [lg for lg in build_loggers(custom, str(tmp_path)) if isinstance(lg, CSVLogger)]
    assert only.name == "mine" and only.save_dir == str(tmp_path)


def test_image_logger_grid_layout():
    logger = ImageLogger(batch_frequency=4, max_images=3, nrow=2)
    assert [s for s in range(1, 13) if logger.check_frequency(s)] == [1, 2, 4, 8, 12]
    images = torch.linspace(-1, 1, 3 * 3 * 4 * 5).reshape(3, 3, 4, 5)
    grid = logger.make_grid(images)
    assert grid.shape == (2 * (4 + 2) + 2, 2 * (5 + 2) + 2, 3) and grid.dtype.name == "uint8"
    expected = ((images[:, :, 0, 0] + 1) / 2 * 255).round().to(torch.uint8)  # first pixel of each image, [-1, 1] -> uint8
    assert grid[2, 2].tolist() == expected[0].tolist()
    assert grid[2, 2 + 5 + 2].tolist() == expected[1].tolist()  # image 1: same row, next column
    assert grid[2 + 4 + 2, 2].tolist() == expected[2].tolist()  # image 2: next row
    assert grid[0].max() == 0 and grid[2 + 4 + 2 :, 2 + 5 + 2 :].max() == 0  # borders and the empty fourth cell


# ---------------------------------------------------------------------------------------------------------------------
# command line errors: one line naming the key and the valid choices


def _load_main_module():
    spec = importlib.util.spec_from_file_location("latesteps_main", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["model.params.t_mni=3"], "takes no argument 't_mni' (did you mean 't_min'?)"),
        (["lightning.trainer.max_step=3"], "unknown Trainer argument lightning.trainer.max_step (did you mean 'max_steps'?)"),
        (["lightning.trainer.gpus=1"], "Lightning 1.x Trainer argument: use lightning.trainer.accelerator=gpu"),
        (["lightning.trainer.callbacks=[]"], "lightning.trainer.callbacks is set by main.py"),
        (["data.params.trian.params.size=8"], "takes no argument 'trian' (did you mean 'train'?)"),
        (["modle.params.t_min=3"], "unknown override key 'modle.params.t_min': top-level keys are model, data, lightning"),
        (["lightning.modelcheckpoint.params.every_n_train_step=1"], "did you mean 'every_n_train_steps'?"),
        (["model.params.unet_config.params.model_chanels=8"], "did you mean 'model_channels'?"),
        (["--trian"], "unrecognized option '--trian' (did you mean --train?)"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_unknown_keys_and_flags_fail_with_one_clear_line(extra, expected, tmp_path, capsys):
    main = _load_main_module()
    code = main.main(["-b", str(QUICKSTART), "-t", "-l", str(tmp_path / "logs"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("main.py: error:") and "\n" not in err, err
    assert expected in err
    assert not (tmp_path / "logs").exists()


def test_unknown_trainer_key_in_a_yaml_and_bad_resume_paths_fail_clearly(tmp_path, capsys):
    main = _load_main_module()
    bad = tmp_path / "bad.yaml"
    bad.write_text("lightning:\n  trainer:\n    max_epoch: 3\n")
    assert main.main(["-b", str(QUICKSTART), str(bad), "-t"]) == 2
    assert "unknown Trainer argument lightning.trainer.max_epoch (did you mean 'max_epochs'?)" in capsys.readouterr().err
    assert main.main(["-r", str(tmp_path / "nope"), "-t"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main.main(["-r", str(tmp_path / "run"), "-t"]) == 2
    assert "never saved a checkpoint" in capsys.readouterr().err
    assert main.main(["-b", str(tmp_path / "missing.yaml"), "-t"]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err
    assert main.main(["-n", "x", "-r", str(tmp_path / "run"), "-t"]) == 2
    assert "-n/--name cannot be given with -r/--resume: a resumed run keeps its log dir" in capsys.readouterr().err
    # -p and -l were ignored on resume (the run went on in its old folder)
    assert main.main(["-p", "x", "-l", str(tmp_path / "other"), "-r", str(tmp_path / "run"), "-t"]) == 2
    assert "-p/--postfix and -l/--logdir cannot be given with -r/--resume" in capsys.readouterr().err
    assert main.main(["-l", "", "-t"]) == 2
    assert "-l/--logdir is empty" in capsys.readouterr().err


def test_missing_init_checkpoint_of_the_finetuning_config_is_a_clear_error(tmp_path):
    config = REPO / "configs" / "quickstart" / "latesteps_750_1000.yaml"
    result = run_main(["-b", str(config), "-t", "-l", str(tmp_path / "logs")], tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "model.params.ckpt_path='models/quickstart/latesteps_500_750.ckpt' does not exist" in line
    assert "previous stage's logs/<run>/checkpoints/last.ckpt" in line
    args = ["-b", str(config), "-t", "-l", str(tmp_path / "logs"), "model.params.ckpt_path=null"]
    result = run_main(args, tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "main.py: error: model.params.first_stage_config.params.ckpt_path="
        "'models/first_stage_models/vq-f4-tiny/model.ckpt' does not exist"
    )
    assert "the first stage must be a trained autoencoder" in line and "configs/quickstart/vq_f4.yaml -t" in line
    assert "python scripts/quickstart.py" in line and "CompVis" not in line
    assert not (tmp_path / "logs").exists()


def test_invalid_window_and_unusable_log_folder_are_refused_before_training(tmp_path):
    result = run_main([*base_args(tmp_path), "-t", "model.params.t_min=600"], tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("main.py: error: window t_min=600, t_max=500 is invalid: need integers 0 <= t_min < t_max")
    assert not (tmp_path / "logs").exists()
    (tmp_path / "a_file").write_text("not a folder")
    result = run_main([*base_args(tmp_path), "-t", "-l", str(tmp_path / "a_file" / "logs")], tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"main.py: error: cannot create the run folder under {str(tmp_path / 'a_file' / 'logs')!r}")


def test_overrides_are_checked_against_the_merged_config_and_constructors(tmp_path):
    compvis = tmp_path / "compvis_lightning.yaml"
    compvis.write_text(
        "lightning:\n  callbacks:\n    image_logger:\n      target: main.ImageLogger\n"
        "      params: {batch_frequency: 5000, max_images: 8, increase_log_steps: false}\n"
    )
    legacy = merge_configs([QUICKSTART, compvis], ["lightning.callbacks.image_logger.params.clamp=false"])
    assert legacy.lightning.callbacks.image_logger.target == "ldm.train.callbacks.ImageLogger"  # CompVis' main.ImageLogger
    assert legacy.lightning.callbacks.image_logger.params.clamp is False
    config = merge_configs([QUICKSTART], [])
    check_override_key(config, "model.params.use_ema")  # a LatentDiffusion argument the YAML does not set
    check_override_key(config, "model.params.unet_config.params.dropout")
    check_override_key(config, "lightning.trainer.precision")
    check_override_key(config, "lightning.callbacks.my_callback.target")
    check_override_key(config, "model.params.unet_config.params.channel_mult.1")
    with pytest.raises(ConfigError, match="channel_mult has no key '7'"):
        check_override_key(config, "model.params.unet_config.params.channel_mult.7")
    with pytest.raises(ConfigError, match="LateStepsLatentDiffusion takes no argument 'window'"):
        check_override_key(config, "model.params.window")
    opt, dotlist = parse_cli(["-b", str(QUICKSTART), "model.params.t_min=0", "-t", "lightning.trainer.max_steps=2"])
    assert opt.base == [str(QUICKSTART)] and opt.train
    assert dotlist == ["model.params.t_min=0", "lightning.trainer.max_steps=2"]
    merged = merge_configs(opt.base, dotlist)
    assert merged.model.params.t_min == 0 and merged.lightning.trainer.max_steps == 2


# ---------------------------------------------------------------------------------------------------------------------
# distributed


@pytest.mark.slow
def test_two_process_cpu_ddp_run_writes_one_log_dir_and_one_checkpoint(tmp_path):
    args = [
        *base_args(tmp_path),
        "-t",
        "-n",
        "ddp",
        "lightning.trainer.strategy=ddp",
        "lightning.trainer.devices=2",
        "lightning.trainer.accelerator=cpu",
        "lightning.trainer.max_steps=2",
    ]
    result = run_main(args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run = only_run_dir(tmp_path / "logs")
    assert run.name.endswith("_ddp")
    assert [p.name for p in run.rglob("last.ckpt")] == ["last.ckpt"]
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["window"] == [250, 500]
    # 16 crops over 2 ranks with batch 4: 2 batches per rank and epoch; the loader state is per rank
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2}]
    assert "Setting learning rate to 1.60e-04 = 1 (accumulate_grad_batches) * 2 (devices)" in result.stdout
    # resumed under DDP: rank 0 holds the run folder's lock, the re-launched rank 1 does not wait for it
    resumed = run_main(["-t", "-r", str(run), "lightning.trainer.max_steps=3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
