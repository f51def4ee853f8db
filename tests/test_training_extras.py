"""Training paths beyond test_main.py: LR multipliers, a resumed LR scheduler, SIGUSR1 / Ctrl+C, LatentDiffusion's
log_images, and main.py's ``-s`` / ``--scale_lr``."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from test_main import MAIN, QUICKSTART, RUN_TIMEOUT, _env, base_args, only_run, train_losses, write_overlay

from ldm.checkpoint import load_checkpoint
from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler
from ldm.train.cli import DEFAULT_SEED, resume_seed
from ldm.util import instantiate_from_config

from conftest import photo_crops, tiny_ldm_params
from warm_python import run_python


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process model work on one thread (conftest asks for two): idle OpenMP threads make the tiny ops of these tests
    orders of magnitude slower on a busy machine.  main.py subprocesses get OMP_NUM_THREADS=1 from test_main._env."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------------
# multipliers (expected values worked out by hand)

COSINE = {"warm_up_steps": 4, "lr_start": 0.1, "lr_max": 1.0, "lr_min": 0.01, "max_decay_steps": 16}
COSINE_EXPECTED = [
    (0, 0.1),
    (2, 0.55),
    (3, 0.775),  # warm-up: 0.1 + 0.9 * n / 4
    (4, 1.0),
    (8, 0.01 + 0.495 * 1.5),
    (10, 0.505),
    (12, 0.01 + 0.495 * 0.5),  # cos(0), cos(pi/3), cos(pi/2), cos(2pi/3)
    (16, 0.01),
    (100, 0.01),  # end of the decay, then flat
]
LINEAR = {"warm_up_steps": [2, 0], "f_start": [0.1, 0.5], "f_max": [1.0, 0.5], "f_min": [0.2, 0.05], "cycle_lengths": [6, 4]}
LINEAR_EXPECTED = [
    (0, 0.1),
    (1, 0.55),  # warm-up of cycle 0
    # latent-diffusion's decay: f_min + (f_max - f_min) * (L - n) / L with n counted from the cycle's start
    (2, 0.2 + 0.8 * 4 / 6),
    (3, 0.6),
    (5, 0.2 + 0.8 / 6),
    (6, 0.5),
    (8, 0.05 + 0.45 / 2),
    (9, 0.05 + 0.45 / 4),  # cycle 1 = steps [6, 10), no warm-up
    (10, 0.05),
    (50, 0.05),  # after the last cycle: its f_min
]


@pytest.mark.parametrize(("step", "expected"), COSINE_EXPECTED)
def test_warmup_cosine_multiplier(step, expected):
    schedule = LambdaWarmUpCosineScheduler(**COSINE)
    assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert schedule.schedule(step) == schedule(step)


@pytest.mark.parametrize(("step", "expected"), LINEAR_EXPECTED)
def test_linear_cycles_multiplier(step, expected):
    assert LambdaLinearScheduler(**LINEAR)(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedulers_refuse_inconsistent_arguments():
    with pytest.raises(ValueError, match="max_decay_steps=4 must exceed warm_up_steps=4"):
        LambdaWarmUpCosineScheduler(**dict(COSINE, max_decay_steps=4))
    with pytest.raises(ValueError, match="same length"):
        LambdaLinearScheduler(**dict(LINEAR, f_min=[0.2]))


# ---------------------------------------------------------------------------------------------------------------------
# DDPM.configure_optimizers with scheduler_config, LatentDiffusion.log_images

ONE_CYCLE = {"warm_up_steps": [2], "f_start": [0.1], "f_max": [1.0], "f_min": [0.2], "cycle_lengths": [6]}
ONE_CYCLE_EXPECTED = [0.1, 0.55, 0.2 + 0.8 * 4 / 6, 0.6, 0.2 + 0.8 * 2 / 6, 0.2 + 0.8 / 6]  # steps 0-5, by hand
SCHEDULER_CONFIG = {"target": "ldm.lr_scheduler.LambdaLinearScheduler", "params": ONE_CYCLE}


@pytest.fixture(scope="module")
def tiny_ldm():
    """Tiny unconditional LatentDiffusion with an LR schedule and a live (non-zero) UNet output layer."""
    torch.manual_seed(0)
    model = instantiate_from_config(
        {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params(scheduler_config=SCHEDULER_CONFIG)}
    )
    torch.nn.init.normal_(model.model.diffusion_model.out[2].weight, std=0.02)
    model.model_ema = type(model.model_ema)(model.model)
    model.learning_rate = 3.0e-4
    return model.eval()


def test_configure_optimizers_returns_a_per_step_lambdalr_following_the_schedule(tiny_ldm):
    optimizers, schedulers = tiny_ldm.configure_optimizers()
    (opt,) = optimizers
    (entry,) = schedulers
    assert isinstance(opt, torch.optim.AdamW) and (entry["interval"], entry["frequency"]) == ("step", 1)
    scheduler = entry["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    for step in range(3):
        assert opt.param_groups[0]["lr"] == pytest.approx(3.0e-4 * ONE_CYCLE_EXPECTED[step], rel=1e-12)
        opt.step()
        scheduler.step()
    # a new optimizer + scheduler loaded from the saved states (what Lightning does on resume) goes on at step 3
    (opt2,), (entry2,) = tiny_ldm.configure_optimizers()
    opt2.load_state_dict(opt.state_dict())
    entry2["scheduler"].load_state_dict(scheduler.state_dict())
    assert entry2["scheduler"].last_epoch == 3
    for step in range(3, 6):
        assert opt2.param_groups[0]["lr"] == pytest.approx(3.0e-4 * ONE_CYCLE_EXPECTED[step], rel=1e-12)
        opt2.step()
        entry2["scheduler"].step()


def _hwc_batch(n: int) -> dict[str, torch.Tensor]:
    return {"image": photo_crops(n, 32, seed=3).permute(0, 2, 3, 1)}


def test_log_images_keys_shapes_and_finite_values(tiny_ldm):
    batch = _hwc_batch(3)
    before = {k: v.clone() for k, v in tiny_ldm.state_dict().items()}
    logs = tiny_ldm.log_images(batch, N=2, ddim_steps=3, n_diffusion_rows=4, seed=1)
    assert set(logs) == {"inputs", "reconstruction", "diffusion_row", "samples"}
    for key in ("inputs", "reconstruction", "samples"):
        assert logs[key].shape == (2, 3, 32, 32), key
    assert logs["diffusion_row"].shape == (4, 3, 32, 32)  # one image, decoded at n_diffusion_rows timesteps
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert torch.equal(logs["inputs"], batch["image"][:2].permute(0, 3, 1, 2))
    after = tiny_ldm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # EMA weights swapped back, nothing trained
    only_inputs = tiny_ldm.log_images(batch, N=1, sample=False, plot_diffusion_rows=False)
    assert set(only_inputs) == {"inputs", "reconstruction"}


def test_log_images_depends_on_its_seed_only(tiny_ldm):
    batch = _hwc_batch(2)
    torch.manual_seed(123)
    first = tiny_ldm.log_images(batch, N=2, ddim_steps=3, n_diffusion_rows=2, seed=5)
    torch.manual_seed(456)  # the global RNG state must not matter
    again = tiny_ldm.log_images(batch, N=2, ddim_steps=3, n_diffusion_rows=2, seed=5)
    other = tiny_ldm.log_images(batch, N=2, ddim_steps=3, n_diffusion_rows=2, seed=6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.allclose(first["samples"], other["samples"])
    assert not torch.allclose(first["diffusion_row"], other["diffusion_row"])


# ---------------------------------------------------------------------------------------------------------------------
# main.py subprocesses

SCHEDULER_OVERLAY = """
model:
  params:
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params: {warm_up_steps: [2], f_start: [0.1], f_max: [1.0], f_min: [0.2], cycle_lengths: [6]}
"""
VQ_TINY = Path(__file__).resolve().parents[1] / "configs" / "autoencoder" / "vq_f4_tiny.yaml"
BASE_LR = 2.0e-5  # model.base_learning_rate of the quickstart config; the overlay's batch size is 4


def _start(args: list[str], folder: Path, tag: str, default_sigint: bool = False) -> subprocess.Popen:
    """``python main.py *args`` in ``folder`` in the background, output to ``folder/<tag>.{out,err}``.

    ``default_sigint``: give the child Python's Ctrl+C handler even where this process was started with SIGINT ignored
    (a background job), so that SIGINT raises KeyboardInterrupt in it."""
    reset = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if default_sigint else None
    with (folder / f"{tag}.out").open("w") as out, (folder / f"{tag}.err").open("w") as err:
        return subprocess.Popen(
            [sys.executable, str(MAIN), *args], cwd=folder, env=_env(), stdout=out, stderr=err, preexec_fn=reset
        )


def _finish(procs: dict[str, subprocess.Popen], folder: Path) -> dict[str, tuple[str, str]]:
    """Wait for all (killing the rest if one overruns); assert exit status 0; ``{tag: (stdout, stderr)}``."""
    try:
        for proc in procs.values():
            proc.wait(timeout=RUN_TIMEOUT)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = {tag: ((folder / f"{tag}.out").read_text(), (folder / f"{tag}.err").read_text()) for tag in procs}
    for tag, proc in procs.items():
        assert proc.returncode == 0, f"{tag}: {outputs[tag][1][-4000:]}"
    return outputs


def _csv_column(run: Path, column: str) -> dict[int, float]:
    """``{step: value}`` of one metric over all CSV logs of a run."""
    values = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(column):
                values[int(row["step"])] = float(row[column])
    return values


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> dict:
    """Seed 7, unscaled LR, the one-cycle schedule: 'full' runs 4 steps, 'part' 2 steps and is then resumed to 4 (without
    -s: the seed comes from the checkpoint);
    'other' runs 1 step with seed 8, the default (scaled) LR and no schedule.  Two processes at a time."""
    folder = tmp_path_factory.mktemp("seeded")
    (folder / "scheduler.yaml").write_text(SCHEDULER_OVERLAY)
    configs = ["-b", str(QUICKSTART), str(write_overlay(folder)), str(folder / "scheduler.yaml")]
    seeded = [*configs, "-l", str(folder / "logs"), "-t", "-s", "7", "--scale_lr", "false"]
    outputs = _finish(
        {
            "full": _start([*seeded, "-n", "full", "lightning.trainer.max_steps=4"], folder, "full"),
            "part": _start([*seeded, "-n", "part", "lightning.trainer.max_steps=2"], folder, "part"),
        },
        folder,
    )
    part = only_run(folder, "part")
    part_checkpoint = load_checkpoint(part / "checkpoints" / "last.ckpt")
    resume = ["-t", "-r", str(part), "--scale_lr", "false", "lightning.trainer.max_steps=4"]  # seed 7 from the checkpoint
    other = [*base_args(folder), "-t", "-n", "other", "-s", "8", "lightning.trainer.max_steps=1"]
    outputs |= _finish({"resumed": _start(resume, folder, "resumed"), "other": _start(other, folder, "other")}, folder)
    return {"folder": folder, "outputs": outputs, "part_checkpoint": part_checkpoint}


def test_resumed_run_continues_the_restored_lr_schedule(seeded_runs):
    folder = seeded_runs["folder"]
    assert "Restored all states from the checkpoint" in "".join(seeded_runs["outputs"]["resumed"])
    assert seeded_runs["part_checkpoint"]["callbacks"]["StepSeeding"] == {"seed": 7}
    assert "resuming with seed 7, stored in" in seeded_runs["outputs"]["resumed"][0]
    assert seeded_runs["part_checkpoint"]["lr_schedulers"][0]["last_epoch"] == 2
    full = load_checkpoint(only_run(folder, "full") / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(only_run(folder, "part") / "checkpoints" / "last.ckpt")
    assert full["global_step"] == resumed["global_step"] == 4
    for checkpoint in (full, resumed):
        (state,) = checkpoint["lr_schedulers"]
        assert state["last_epoch"] == 4 and state["base_lrs"] == [BASE_LR]
        assert state["_last_lr"][0] == pytest.approx(BASE_LR * ONE_CYCLE_EXPECTED[4], rel=1e-12)
        assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == state["_last_lr"][0]
    assert full["lr_schedulers"] == resumed["lr_schedulers"]
    # the LR used at each step (logged before the optimizer step), before and after the resume
    lrs = _csv_column(only_run(folder, "part"), "lr_abs")
    assert lrs == _csv_column(only_run(folder, "full"), "lr_abs")
    assert lrs == pytest.approx({step: BASE_LR * ONE_CYCLE_EXPECTED[step] for step in range(4)}, rel=1e-6)
    assert train_losses(only_run(folder, "part")) == train_losses(only_run(folder, "full"))
    for key in full["state_dict"]:
        assert torch.equal(full["state_dict"][key], resumed["state_dict"][key]), key


def test_resume_seed_prefers_the_stored_seed_and_warns_on_an_explicit_other(tmp_path):
    with_seed, without = tmp_path / "with.ckpt", tmp_path / "without.ckpt"
    weights = {"w": torch.ones(3)}
    torch.save({"state_dict": weights, "global_step": 2, "callbacks": {"StepSeeding": {"seed": 7}}}, with_seed)
    torch.save({"state_dict": weights, "global_step": 2}, without)
    assert resume_seed(with_seed, None)[0] == 7
    assert resume_seed(with_seed, 7) == (7, f"resuming with seed 7, stored in {with_seed}")
    seed, note = resume_seed(with_seed, 8)
    assert seed == 8 and note.startswith("warning:") and "seed 7" in note and "drop -s" in note
    assert resume_seed(without, None)[0] == DEFAULT_SEED == 23
    odd = tmp_path / "odd.ckpt"  # not written by main.py: callbacks as a list
    torch.save({"state_dict": weights, "callbacks": [{"seed": 7}]}, odd)
    assert resume_seed(odd, None)[0] == DEFAULT_SEED
    seed, note = resume_seed(without, 5)
    assert seed == 5 and "stores no seed" in note


def test_scale_lr_false_keeps_the_base_learning_rate(seeded_runs):
    full_stdout = seeded_runs["outputs"]["full"][0]
    assert "Not scaling the learning rate; learning rate 2.00e-05" in full_stdout and "Setting learning rate" not in full_stdout
    assert "Not scaling the learning rate; learning rate 2.00e-05" in seeded_runs["outputs"]["resumed"][0]
    assert seeded_runs["part_checkpoint"]["optimizer_states"][0]["param_groups"][0]["initial_lr"] == BASE_LR
    # default: scaled by accumulate_grad_batches * devices * nodes * batch size = 1 * 1 * 1 * 4
    assert "Setting learning rate to 8.00e-05" in seeded_runs["outputs"]["other"][0]
    other = load_checkpoint(only_run(seeded_runs["folder"], "other") / "checkpoints" / "last.ckpt")
    assert other["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(4 * BASE_LR, rel=1e-12)
    assert other["lr_schedulers"] == []


def test_seed_fixes_initial_weights_and_first_losses(seeded_runs):
    folder = seeded_runs["folder"]
    full, other = (train_losses(only_run(folder, name)) for name in ("full", "other"))
    part_before_resume = {step: loss for step, loss in train_losses(only_run(folder, "part")).items() if step < 2}
    assert part_before_resume == {0: full[0], 1: full[1]}  # same seed, separate processes: bit-identical
    assert other[0] != full[0]
    # the frozen first stage (random here: ckpt_path null) keeps its seeded initial weights
    same = seeded_runs["part_checkpoint"]["state_dict"]
    full_weights = load_checkpoint(only_run(folder, "full") / "checkpoints" / "last.ckpt")["state_dict"]
    other_weights = load_checkpoint(only_run(folder, "other") / "checkpoints" / "last.ckpt")["state_dict"]
    first_stage = [k for k in same if k.startswith("first_stage_model.")]
    assert first_stage and all(torch.equal(same[k], full_weights[k]) for k in first_stage)
    assert not all(torch.equal(same[k], other_weights[k]) for k in first_stage)


def _interrupt_after_step(
    tmp_path: Path, tag: str, max_steps: int, signum: int, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, Path]:
    """Start a run that logs images every step and checkpoints only every 1000 steps; once step 2's images exist, send
    ``signum`` and wait for the process to end; returns it and the run folder."""
    args = [
        *base_args(tmp_path),
        "-t",
        "-n",
        tag,
        f"lightning.trainer.max_steps={max_steps}",
        "lightning.callbacks.image_logger.params.batch_frequency=1",
        "lightning.modelcheckpoint.params.every_n_train_steps=1000",
        *extra,
    ]
    proc = _start(args, tmp_path, tag, default_sigint=signum == signal.SIGINT)
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if list((tmp_path / "logs").glob(f"*_{tag}/images/train/inputs_gs-000002_*.png")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signum)
    proc.wait(timeout=RUN_TIMEOUT)
    return proc, only_run(tmp_path, tag)


def _saved_step(stderr: str, reason: str, run: Path) -> int:
    (match,) = re.findall(rf"{reason}: saved (\S+) at global step (\d+)", stderr)
    assert match[0] == str(run / "checkpoints" / "last.ckpt")
    return int(match[1])


def test_sigusr1_writes_last_ckpt_and_training_goes_on_to_the_end(tmp_path):
    # no save_last: the end of training would overwrite last.ckpt, and only the interrupt callback writes it here
    no_last = ("lightning.modelcheckpoint.params.save_last=false",)
    proc, run = _interrupt_after_step(tmp_path, "usr1", max_steps=12, signum=signal.SIGUSR1, extra=no_last)
    stderr = (tmp_path / "usr1.err").read_text()
    assert proc.returncode == 0, stderr[-4000:]
    step = _saved_step(stderr, "SIGUSR1", run)
    assert 2 <= step < 12
    assert sorted(train_losses(run)) == list(range(12))  # every step ran, after the save too
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == step and checkpoint["window"] == [250, 500] and "config" in checkpoint


def test_ctrl_c_writes_last_ckpt_and_exits_one(tmp_path):
    proc, run = _interrupt_after_step(tmp_path, "int", max_steps=10000, signum=signal.SIGINT)
    stderr = (tmp_path / "int.err").read_text()
    assert proc.returncode == 1, stderr[-4000:]  # Lightning's sys.exit(1) after a KeyboardInterrupt
    assert "Detected KeyboardInterrupt" in stderr + (tmp_path / "int.out").read_text()
    step = _saved_step(stderr, "KeyboardInterrupt", run)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == step and 2 <= step < 1000
    assert checkpoint["window"] == [250, 500] and "config" in checkpoint
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------------
# DDP strategy per model


@pytest.mark.parametrize(
    "trainer_args",
    [{"strategy": "ddp"}, {}, {"strategy": "ddp_spawn"}],  # named, chosen by Lightning for devices=2, spawned
    ids=["ddp", "auto", "ddp_spawn"],
)
def test_ddp_strategy_is_configured_for_the_model(trainer_args):
    from ldm.train.trainer import configure_ddp

    def ddp_kwargs(model: pl.LightningModule, **extra) -> dict:
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, **{**trainer_args, **extra}
        )
        configure_ddp(trainer.strategy, model)
        return trainer.strategy._ddp_kwargs

    ldm_model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    vq_cfg = OmegaConf.to_container(OmegaConf.load(VQ_TINY).model, resolve=True)
    vq_model = instantiate_from_config(vq_cfg)
    for_ldm = ddp_kwargs(ldm_model)
    sync_key = "forward_sync_buffers" if "forward_sync_buffers" in for_ldm else "broadcast_buffers"
    assert for_ldm == {sync_key: False}  # no per-forward broadcast of the EMA buffers
    assert ddp_kwargs(vq_model) == {"find_unused_parameters": True}  # the idle discriminator before disc_start
    assert ddp_kwargs(pl.LightningModule()) == {}
    if trainer_args:  # an explicit choice wins
        explicit = ddp_kwargs(vq_model, strategy="ddp_find_unused_parameters_false")
        assert explicit == {"find_unused_parameters": False}
    assert configure_ddp(pl.Trainer(accelerator="cpu", devices=1, logger=False).strategy, vq_model) == {}


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_the_vq_autoencoder_across_disc_start(tmp_path):
    """DDP as Lightning picks it for ``devices=2`` (no strategy named) on the VQGAN: before disc_start the
    discriminator is idle (DDP needs find_unused_parameters), after it both optimizers step."""
    args = [
        "-b",
        str(VQ_TINY),
        "-t",
        "-l",
        str(tmp_path / "logs"),
        "lightning.trainer.devices=2",
        "lightning.trainer.accelerator=cpu",
        "lightning.trainer.max_steps=4",
        "lightning.trainer.num_sanity_val_steps=0",
        "lightning.trainer.enable_progress_bar=false",
        "lightning.trainer.enable_model_summary=false",
        "model.params.lossconfig.params.disc_start=1",
        "data.params.batch_size=4",
        "data.params.train.params.n_samples=32",
        "data.params.validation.params.n_samples=8",
    ]
    result = run_python([MAIN, *args], cwd=tmp_path, env=_env(), timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = (tmp_path / "logs").iterdir()
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] >= 4 and len(checkpoint["optimizer_states"]) == 2  # 2 optimizer steps per batch
    disc_state = checkpoint["optimizer_states"][1]["state"]
    assert disc_state and all(int(s["step"]) >= 1 for s in disc_state.values())  # the discriminator did train
