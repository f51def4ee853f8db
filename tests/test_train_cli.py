"""ldm.train.cli: list entries are overridden by index, fuzzed command lines merge or fail with one ConfigError line,
and a checkpoint storing an invalid seed resumes with the default seed and a warning."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from test_main import QUICKSTART

from ldm.train.cli import merge_configs, parse_cli
from ldm.util import ConfigError


def test_list_entries_are_overridden_by_index():
    merged = merge_configs([QUICKSTART], ["model.params.unet_config.params.channel_mult.1=4", "model.params.use_ema=false"])
    assert list(merged.model.params.unet_config.params.channel_mult) == [1, 4]
    assert merged.model.params.use_ema is False


OVERRIDE_KEYS = st.sampled_from(
    [
        "model.params.t_min",
        "model.params",
        "model",
        "model.target",
        "lightning.trainer.max_steps",
        "data.params.batch_size",
        "model.params.unet_config.params.channel_mult.0",
        "model.params.unet_config.params.channel_mult.-1",
        "model.params.unet_config.params.channel_mult.9",
        "lightning.callbacks.x.target",
        "model.params.first_stage_config",
        "a..b",
        ".x",
        "lightning.trainer.gpus",
    ]
)
OVERRIDE_VALUES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        ["${nope}", "${model.params.t_max}", "[1,2", "{a: 1}", "null", "???", "'", "!!python/object:os.system", "1e309", "[]"]
    ),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.one_of(st.builds("{}={}".format, OVERRIDE_KEYS, OVERRIDE_VALUES), st.text(max_size=12)), max_size=3))
def test_fuzzed_main_py_overrides_merge_or_fail_with_a_config_error(tokens):
    try:
        opt, dotlist = parse_cli(["-b", str(QUICKSTART), "-t", *tokens])
        merged = merge_configs(opt.base, dotlist)
    except ConfigError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
        return
    OmegaConf.to_container(merged, resolve=True)  # what main.py does next: must not fail any more


def test_a_checkpoint_storing_an_invalid_seed_resumes_with_a_warning(tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.train.callbacks import StepSeeding
    from ldm.train.cli import DEFAULT_SEED, resume_seed

    for stored in (2**40, -3, "23", True):
        path = tmp_path / "last.ckpt"
        save_checkpoint({"state_dict": {}, "callbacks": {StepSeeding.STATE_KEY: {"seed": stored}}}, path)
        seed, note = resume_seed(path, None)
        assert seed == DEFAULT_SEED and note.startswith("warning:") and "stores an invalid seed" in note, note
        assert resume_seed(path, 7)[0] == 7


def test_a_resume_starts_from_the_newest_saved_pair_only(tmp_path):
    """Each save holds the whole merged config: merging every one (latent-diffusion's way) undid later deletions."""
    from ldm.train.cli import saved_run_configs

    configs = tmp_path / "configs"
    configs.mkdir()
    for ts in ("2026-01-01T00-00-00", "2026-01-02T00-00-00"):
        for part in ("project", "lightning"):
            (configs / f"{ts}-{part}.yaml").write_text("{}\n")
    assert [p.rsplit("/", 1)[1] for p in saved_run_configs(tmp_path)] == [
        "2026-01-02T00-00-00-project.yaml",
        "2026-01-02T00-00-00-lightning.yaml",
    ]
    for f in configs.iterdir():
        f.unlink()
    (configs / "a.yaml").write_text("{}\n")
    (configs / "b.yaml").write_text("{}\n")  # not main.py's names: every file, oldest first, as before
    assert [p.rsplit("/", 1)[1] for p in saved_run_configs(tmp_path)] == ["a.yaml", "b.yaml"]


def test_resume_takes_the_run_folder_its_checkpoints_folder_or_a_checkpoint_in_it(tmp_path):
    """``-r <run>/checkpoints`` said "<run>/checkpoints/checkpoints/last.ckpt does not exist (the run never saved...)"."""
    from ldm.train.cli import resolve_resume

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    for argument in (tmp_path / "run", tmp_path / "run" / "checkpoints", last):
        assert resolve_resume(str(argument)) == (tmp_path / "run", last)
