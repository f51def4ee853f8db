"""Layering configs: a layer that gives a node another ``target`` replaces that node's ``params``, ``~key``
deletes (command line and YAML), everything else merges as OmegaConf does; bad deletions are one-line ConfigErrors.
README's cached-data YAML layered over the quick start's config; the hint for a missing first stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_latent_cache import QUICKSTART, README_CACHED_DATA, cache_cli, make_first_stage_ckpt, project_config

from ldm.data.cached_latents import CachedLatents
from ldm.train.cli import CLIError, apply_overrides, merge_configs, parse_cli
from ldm.train.config_merge import delete_key, merge_layers
from ldm.util import ConfigError, instantiate_from_config

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """8 images, a first-stage checkpoint and their latent cache (as test_latent_cache.py's fixture)."""
    root = tmp_path_factory.mktemp("cache")
    write_image_folder(root / "images", 8)
    ckpt = make_first_stage_ckpt(root / "vq.ckpt", seed=0)
    config = project_config(root / "config.yaml", ckpt, {})
    argv = ["--config", str(config), "--data", str(root / "images"), "--out", str(root / "cache"), "--split", "all"]
    assert cache_cli.main(argv) == 0
    return {"out": root / "cache", "ckpt": ckpt}


BASE = {
    "model": {
        "target": "a.Model",
        "base_learning_rate": 1.0,
        "params": {"x": 1, "inner": {"target": "a.Inner", "params": {"p": 1, "q": 2}}},
    },
    "data": {
        "target": "a.Data",
        "params": {
            "batch_size": 8,
            "train": {"target": "a.Images", "params": {"size": 32, "split": "train"}},
            "validation": {"target": "a.Images", "params": {"size": 32}},
        },
    },
}


def layered(*layers: dict):
    return OmegaConf.to_container(merge_layers([(f"layer{i}", OmegaConf.create(c)) for i, c in enumerate(layers)]))


def test_a_new_target_replaces_the_params_of_its_node_only():
    merged = layered(
        BASE,
        {
            "data": {
                "target": "a.Data",
                "params": {"batch_size": 48, "train": {"target": "a.Cached", "params": {"root": "cache/train"}}},
            }
        },
    )
    assert merged["data"]["params"]["train"] == {"target": "a.Cached", "params": {"root": "cache/train"}}
    assert merged["data"]["params"]["batch_size"] == 48  # same target: merged
    assert merged["data"]["params"]["validation"] == BASE["data"]["params"]["validation"]  # untouched
    assert merged["model"] == BASE["model"]


def test_the_same_target_or_no_target_merges_as_before():
    same = layered(BASE, {"model": {"target": "a.Model", "params": {"inner": {"target": "a.Inner", "params": {"q": 5}}}}})
    assert same["model"]["params"]["inner"]["params"] == {"p": 1, "q": 5} and same["model"]["params"]["x"] == 1
    none = layered(BASE, {"model": {"params": {"inner": {"params": {"q": 5}}}}})
    assert none == same
    plain = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.create(BASE), OmegaConf.create({"model": {"params": {"inner": {"params": {"q": 5}}}}}))
    )
    assert none == plain


def test_a_new_target_without_params_leaves_none_and_keeps_siblings_of_params():
    merged = layered(BASE, {"model": {"target": "b.Other"}})
    assert merged["model"] == {"target": "b.Other", "base_learning_rate": 1.0}
    deeper = layered(BASE, {"model": {"params": {"inner": {"target": "b.Inner", "params": {"r": 3}}}}})
    assert deeper["model"]["params"] == {"x": 1, "inner": {"target": "b.Inner", "params": {"r": 3}}}


def test_yaml_tilde_keys_delete_from_the_layers_before():
    merged = layered(BASE, {"data": {"params": {"~validation": None, "batch_size": 4}}})
    assert "validation" not in merged["data"]["params"] and merged["data"]["params"]["batch_size"] == 4
    replaced = layered(BASE, {"model": {"params": {"~inner": None, "inner": {"target": "a.Inner", "params": {"q": 9}}}}})
    assert replaced["model"]["params"]["inner"] == {"target": "a.Inner", "params": {"q": 9}}  # delete, then set
    with pytest.raises(
        ConfigError,
        match=r"cannot delete 'data.params.test' \(layer1\): data.params has no key 'test'; "
        r"it has: batch_size, train, validation",
    ):
        layered(BASE, {"data": {"params": {"~test": None}}})
    with pytest.raises(ConfigError, match=r"data.params.~validation: a ~key deletes 'validation' and takes no value"):
        layered(BASE, {"data": {"params": {"~validation": 1}}})


def test_the_first_layer_and_the_defaults_are_not_modified():
    start = OmegaConf.create(BASE)
    merge_layers([("top", OmegaConf.create({"data": {"params": {"~validation": None}, "target": "b.Data"}}))], start)
    assert OmegaConf.to_container(start) == BASE


def test_command_line_deletions_and_target_changes(tmp_path):
    config = OmegaConf.create(BASE)
    apply_overrides(
        config,
        [
            "~data.params.validation",
            "data.params.train.target=a.Cached",
            "data.params.train.params.root=c",
            "model.params.inner={target: b.Inner, params: {r: 1}}",
        ],
    )
    plain = OmegaConf.to_container(config)
    assert plain["data"]["params"] == {"batch_size": 8, "train": {"target": "a.Cached", "params": {"root": "c"}}}
    assert plain["model"]["params"]["inner"] == {"target": "b.Inner", "params": {"r": 1}}
    apply_overrides(config, ["data.params.train.target=a.Cached", "data.params.train.params.seed=3"])  # same target
    assert config.data.params.train.params == {"root": "c", "seed": 3}
    apply_overrides(config, ["~model.params.inner.params.r"])
    assert config.model.params.inner.params == {}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (["data", "params", "test"], "data.params has no key 'test'; it has: batch_size, train, validation"),
        (["nope"], "the config has no key 'nope'; it has: model, data"),
        (["model", "target", "x"], "model.target is a value, not a mapping or list"),
        (["data", "params", "batch_size", "x"], "data.params.batch_size is a value"),
    ],
)
def test_deleting_what_is_not_there_names_what_is(path, expected):
    with pytest.raises(ConfigError, match="cannot delete") as info:
        delete_key(OmegaConf.create(BASE), path, source="~" + ".".join(path))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_list_entries_are_deleted_by_index():
    config = merge_configs([QUICKSTART], ["~model.params.unet_config.params.channel_mult.0"])
    assert list(config.model.params.unet_config.params.channel_mult) == [2]
    with pytest.raises(ConfigError, match=r"channel_mult has no key '5'; it is a list of 2 entries \(indices 0..1\)"):
        merge_configs([QUICKSTART], ["~model.params.unet_config.params.channel_mult.5"])


def test_main_py_command_line_takes_tilde_tokens_anywhere_and_refuses_malformed_ones():
    opt, dotlist = parse_cli(["-b", str(QUICKSTART), "~data.params.validation", "-t", "model.params.t_min=0"])
    assert opt.base == [str(QUICKSTART)] and dotlist == ["~data.params.validation", "model.params.t_min=0"]
    merged = merge_configs(opt.base, dotlist)
    assert "validation" not in merged.data.params and merged.model.params.t_min == 0
    for token, expected in (
        ("~", "a deletion names a key"),
        ("~a..b", "a deletion names a key"),
        ("~data.params.validation=1", "a deletion is ~key alone (no '=')"),
    ):
        with pytest.raises(CLIError) as info:
            parse_cli(["-b", str(QUICKSTART), "-t", token])
        assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CLIError, match="or ~key to delete a key"):
        parse_cli(["-b", str(QUICKSTART), "-t", "stray"])


def test_override_keys_are_checked_against_the_config_the_earlier_overrides_left():
    """A new target's arguments are valid after the override that sets the target, and only then."""
    overrides = ["data.params.train.target=ldm.data.cached_latents.CachedLatents", "data.params.train.params.root=c"]
    merged = merge_configs([QUICKSTART], overrides)
    assert OmegaConf.to_container(merged.data.params.train) == {
        "target": "ldm.data.cached_latents.CachedLatents",
        "params": {"root": "c"},
    }
    with pytest.raises(ConfigError, match="EmbeddedPhotos takes no argument 'root'"):
        merge_configs([QUICKSTART], overrides[::-1])
    with pytest.raises(ConfigError, match="cannot delete 'data.params.train.params.size'"):
        merge_configs([QUICKSTART], [*overrides, "~data.params.train.params.size"])


def test_compvis_callback_target_is_not_a_new_target(tmp_path):
    """latent-diffusion's main.ImageLogger is this project's ImageLogger: its params still merge."""
    compvis = tmp_path / "compvis.yaml"
    compvis.write_text(
        "lightning:\n  callbacks:\n    image_logger:\n      target: main.ImageLogger\n      params: {batch_frequency: 5}\n"
    )
    merged = merge_configs([QUICKSTART, compvis], [])
    logger = merged.lightning.callbacks.image_logger
    assert logger.target == "ldm.train.callbacks.ImageLogger" and logger.params.batch_frequency == 5
    assert logger.params.log_images_kwargs.ddim_steps == 50  # kept from the quickstart config


def test_yaml_files_layer_with_both_rules(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "data:\n  params:\n    ~validation: null\n    train:\n"
        "      target: ldm.data.cached_latents.CachedLatents\n      params: {root: cache/train}\n"
    )
    merged = merge_configs([QUICKSTART, overlay], [])
    assert list(merged.data.params) == ["batch_size", "num_workers", "train"]
    assert OmegaConf.to_container(merged.data.params.train.params) == {"root": "cache/train"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  params:\n    ~test: null\n")
    with pytest.raises(ConfigError, match=rf"cannot delete 'data.params.test' \({bad}\)"):
        merge_configs([QUICKSTART, bad], [])


def test_readme_cached_data_yaml_layers_over_the_quickstart_config(cache, tmp_path):
    """``main.py -b configs/quickstart/latesteps_500_750.yaml my_cached_data.yaml``: the train dataset becomes
    CachedLatents with README's params only (not the image dataset's size/split/n_samples); the data module builds."""
    from ldm.train.cli import merge_configs
    from ldm.train.data import check_cached_first_stage, check_first_items
    from ldm.train.trainer import default_lightning_config

    overlay = tmp_path / "my_cached_data.yaml"
    overlay.write_text(README_CACHED_DATA)
    tiny = [f"data.params.train.params.root={cache['out']}", "data.params.batch_size=4"]  # a cache of 8 latents
    config = merge_configs([QUICKSTART, overlay], tiny, defaults=default_lightning_config())
    data_cfg = OmegaConf.to_container(config.data, resolve=True)
    assert data_cfg["params"]["train"] == {
        "target": "ldm.data.cached_latents.CachedLatents",
        "params": {"root": str(cache["out"])},
    }
    assert data_cfg["params"]["num_workers"] == 8 and data_cfg["params"]["validation"]["params"]["size"] == 32
    data = instantiate_from_config(data_cfg)
    data.setup("fit")
    check_first_items(data)
    assert isinstance(data.datasets["train"], CachedLatents) and len(data.datasets["train"]) == 8
    model_cfg = OmegaConf.to_container(config.model, resolve=True)
    model_cfg.pop("base_learning_rate")
    model_cfg["params"]["first_stage_config"]["params"]["ckpt_path"] = str(cache["ckpt"])
    check_cached_first_stage(data, instantiate_from_config(model_cfg))  # the cache's own first stage: accepted


@pytest.mark.parametrize(
    ("config", "expected", "absent"),
    [
        (
            "configs/quickstart/latesteps_500_750.yaml",
            [
                "train it with python main.py --base configs/quickstart/vq_f4.yaml -t (or python scripts/quickstart.py, which "
                "runs exactly this",
                "and pass model.params.first_stage_config.params.ckpt_path=<its checkpoint>",
            ],
            "CompVis",
        ),
        (
            "configs/latesteps_500_750.yaml",
            [
                "put CompVis' vq-f4 weights there (https://ommer-lab.com/files/latent-diffusion/vq-f4.zip, unzip to "
                "models/first_stage_models/vq-f4/model.ckpt)",
                "or train it with python main.py --base configs/autoencoder/vq_f4.yaml -t and pass",
            ],
            "quickstart",
        ),
        (
            "configs/synthetic/latesteps_500_750.yaml",
            ["python main.py --base configs/synthetic/vq_f4.yaml -t (or python scripts/quickstart.py --domain synthetic,"],
            "CompVis",
        ),
    ],
)
def test_a_missing_first_stage_hint_fits_the_config(config, expected, absent, monkeypatch):
    """The hint comes from the configs: the autoencoder config of the same network trains it (and the script its
    comment names runs it); CompVis' download only for CompVis' own location."""
    from ldm.models.autoencoder_training import missing_first_stage_hint

    monkeypatch.chdir(REPO)
    params = OmegaConf.to_container(OmegaConf.load(REPO / config).model.params.first_stage_config.params)
    hint = missing_first_stage_hint(params["ckpt_path"], params)
    assert all(text in hint for text in expected) and absent not in hint, hint
    elsewhere = missing_first_stage_hint("elsewhere/vq.ckpt", params)  # an override of the path: same trainer, no
    assert "CompVis" not in elsewhere and expected[-1].removeprefix("or ") in elsewhere  # download
    unknown = missing_first_stage_hint("x.ckpt", {**params, "n_embed": 7})
    assert unknown.startswith("train a first stage of this network")


def test_the_autoencoder_itself_names_the_config_that_trains_it(tmp_path):
    from ldm.checkpoint import CheckpointError

    cfg = OmegaConf.to_container(OmegaConf.load(QUICKSTART).model.params.first_stage_config)
    cfg["params"]["ckpt_path"] = str(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="does not exist; train it with python main.py --base ") as info:
        instantiate_from_config(cfg)
    assert "configs/quickstart/vq_f4.yaml -t" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "tokens, message",
    [
        # found by the fuzzed override test: a later override met an earlier one's ${...} while checking its key
        (["model.params.t_min=${0}", "model.params.t_min=1"], "Interpolation key '0' not found"),
        (["model.params=${model.params.t_max}", "model.params.t_min=3"], "RecursionError"),
        (["lightning.callbacks.x.target=${0}"], "Interpolation key '0' not found"),
    ],
)
def test_overrides_with_unresolvable_interpolations_are_config_errors(tokens, message):
    opt, dotlist = parse_cli(["-b", str(QUICKSTART), "-t", *tokens])
    with pytest.raises(ConfigError, match=message) as err:
        merge_configs(opt.base, dotlist)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "layer",
    [
        "model:\n  params: [1, 2]\n",
        "lightning: [1]\n",
        "model:\n  params:\n    unet_config:\n      params:\n        channel_mult: {a: 1}\n",
    ],
)
def test_a_yaml_layer_of_another_container_type_is_a_config_error(tmp_path, layer):
    """Hostile pass: a list layered over a mapping (or back) ended in a TypeError traceback."""
    (tmp_path / "layer.yaml").write_text(layer)
    opt, dotlist = parse_cli(["-b", str(QUICKSTART), str(tmp_path / "layer.yaml"), "-t"])
    with pytest.raises(ConfigError, match="layer.yaml over .*: Cannot merge incompatible container types") as err:
        merge_configs(opt.base, dotlist)
    assert "\n" not in str(err.value)
