"""What to tell a user whose first-stage checkpoint is missing: where its weights come from.

Derived from data, not written per config: the ``configs/**/*.yaml`` autoencoder config whose network (``ddconfig``,
``n_embed``, ``embed_dim``) equals the first stage's (and the script its comment says "runs exactly this"), and the
CompVis download when ``ckpt_path`` is ``models/first_stage_models/<name>/model.ckpt`` of a released model.
Used by ``main.py`` and the first stages' ``init_from_ckpt``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
FIRST_STAGE_CKPT_KEY = "model.params.first_stage_config.params.ckpt_path"
# the first stages CompVis released with latent-diffusion (scripts/download_first_stages.sh there)
COMPVIS_FIRST_STAGES = ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")
COMPVIS_URL = "https://ommer-lab.com/files/latent-diffusion/{name}.zip"
NETWORK_KEYS = ("ddconfig", "n_embed", "embed_dim")
# "(scripts/quickstart.py --domain synthetic runs exactly this)" in a config's comment
_RUNS_THIS = re.compile(r"\((?:python\s+)?(scripts/[\w./-]+\.py[^()\n]*?)\s+runs exactly this\)")


def compvis_name(ckpt_path: str) -> str | None:
    """The CompVis first stage whose download location ``ckpt_path`` is (``models/first_stage_models/vq-f4/model.ckpt``
    -> ``vq-f4``), else None."""
    parts = Path(str(ckpt_path)).parts
    if len(parts) >= 4 and parts[-4:-2] == ("models", "first_stage_models") and parts[-1] == "model.ckpt":
        return parts[-2] if parts[-2] in COMPVIS_FIRST_STAGES else None
    return None


def _network(params: Mapping[str, Any]) -> str | None:
    """A canonical text of a first stage's network (None when it lacks one of :data:`NETWORK_KEYS`)."""
    if not isinstance(params, Mapping) or any(key not in params for key in NETWORK_KEYS):
        return None
    try:
        return json.dumps({key: params[key] for key in NETWORK_KEYS}, sort_keys=True, default=list)
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=4)
def _autoencoder_configs(root: str) -> tuple[tuple[str, str, str | None], ...]:
    """``(network, path, script)`` of every autoencoder training config under ``root`` (unreadable files skipped)."""
    import yaml

    found = []
    for path in sorted(Path(root).rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text)
            model = data["model"]
            target, params = model["target"], model["params"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
            continue
        if not isinstance(target, str) or not target.endswith(".VQModel"):
            continue
        network = _network(params)
        if network is not None:
            script = _RUNS_THIS.search(text)
            found.append((network, str(path), script.group(1).strip() if script else None))
    return tuple(found)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (as a user would type it), else as is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path


def training_configs(params: Mapping[str, Any], root: str | os.PathLike = CONFIGS) -> list[tuple[str, str | None]]:
    """``(config, script)`` of the configs under ``root`` that train a first stage of this network (``params``: the
    first stage's ``params``); ``script`` is the command that "runs exactly this", or None."""
    network = _network(params)
    if network is None or not Path(root).is_dir():
        return []
    return [(_shown(path), script) for net, path, script in _autoencoder_configs(str(root)) if net == network]


def missing_first_stage_hint(
    ckpt_path: str, params: Mapping[str, Any] | None = None, key: str = FIRST_STAGE_CKPT_KEY, root: str | os.PathLike = CONFIGS
) -> str:
    """What to do about a first-stage checkpoint ``ckpt_path`` that is not there, for a first stage with ``params``
    (its ``ddconfig``, ``n_embed``, ``embed_dim``): the CompVis download, the config that trains it, or both."""
    hints = []
    name = compvis_name(ckpt_path)
    if name is not None:
        hints.append(
            f"put CompVis' {name} weights there ({COMPVIS_URL.format(name=name)}, unzip to "
            f"models/first_stage_models/{name}/model.ckpt)"
        )
    trainers = training_configs(params or {}, root)
    own = Path(root) / "autoencoder" / f"{(name or '').replace('-', '_')}.yaml"
    if not trainers and name is not None and own.is_file():  # CompVis' location, another network: its own config
        trainers = [(_shown(str(own)), None)]
    if trainers:
        config, script = trainers[0]
        also = ""
        if script:
            also = f" (or python {script}, which runs exactly this; its checkpoints land in <outdir>/checkpoints/)"
        hints.append(
            f"train it with python main.py --base {config} -t{also} and pass {key}=<its checkpoint> "
            "(main.py writes logs/<run>/checkpoints/last.ckpt)"
        )
    if not hints:
        hints.append(
            "train a first stage of this network (an autoencoder config under configs/, python main.py "
            f"--base <config> -t) and pass {key}=<its logs/<run>/checkpoints/last.ckpt>"
        )
    return "; or ".join(hints)
