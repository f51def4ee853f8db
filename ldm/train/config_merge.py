"""How ``main.py`` layers configs: :func:`omegaconf.OmegaConf.merge`, plus two rules (README "Training"): a layer that
gives a ``{target, params}`` node another ``target`` replaces its ``params`` (another class takes other arguments), and
``~key`` (command line) or a ``~name: null`` entry (YAML layer) deletes a key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.util import ConfigError

DELETE_PREFIX = "~"


def is_deletion(token: str) -> bool:
    return token.startswith(DELETE_PREFIX)


def _plain(node: Any) -> Any:
    """``node`` as plain containers, interpolations and ``???`` kept as written."""
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node


def _replaced_params(base: Any, incoming: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (in ``base``) of the ``{target, params}`` nodes whose ``params`` ``incoming`` replaces by naming another
    target; both arguments are plain containers."""
    if not isinstance(base, dict) or not isinstance(incoming, dict):
        return []
    replaced = "target" in incoming and "target" in base and "params" in base and incoming["target"] != base["target"]
    found, skip = ([path], "params") if replaced else ([], None)
    for key, value in incoming.items():
        if key != skip and key in base:
            found += _replaced_params(base[key], value, (*path, key))
    return found


def _node_at(config: Any, path: Sequence[Any]) -> Any:
    node = config
    for key in path:
        node = node[key]
    return node


def drop_replaced_params(base: DictConfig, incoming: Any, where: Sequence[Any] = ()) -> None:
    """Delete from ``base`` the ``params`` of every node to which ``incoming`` (to be merged at ``where``, a path of
    keys in ``base``) gives another ``target``."""
    try:
        node = _node_at(base, where)
    except (KeyError, IndexError, TypeError, AttributeError):
        return
    if not isinstance(node, DictConfig):
        return
    for path in _replaced_params(_plain(node), _plain(incoming)):
        del _node_at(node, path)["params"]


def _strip_deletions(layer: Any, path: tuple[Any, ...] = ()) -> tuple[Any, list[tuple[Any, ...]]]:
    """``layer`` (plain containers) without its ``~name`` keys, and the paths they delete."""
    if not isinstance(layer, dict):
        return layer, []
    kept, deleted = {}, []
    for key, value in layer.items():
        if isinstance(key, str) and is_deletion(key) and len(key) > len(DELETE_PREFIX):
            where = ".".join(str(p) for p in (*path, key))
            if value is not None:
                raise ConfigError(
                    f"{where}: a ~key deletes {key[len(DELETE_PREFIX) :]!r} and takes no value (write {key}: null)"
                )
            deleted.append((*path, key[len(DELETE_PREFIX) :]))
            continue
        kept[key], inner = _strip_deletions(value, (*path, key))
        deleted += inner
    return kept, deleted


def _describe(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "the config"


def delete_key(config: DictConfig, path: Sequence[Any], source: str = "") -> None:
    """Remove ``path`` (a sequence of keys and list indices) from ``config``; a missing key is a :class:`ConfigError`
    naming the keys that are there (``source``: where the deletion was written, for the message)."""
    node: Any = config
    origin = f" ({source})" if source else ""
    for i, key in enumerate(path):
        if isinstance(node, DictConfig):
            present = key in node
        elif isinstance(node, ListConfig) and str(key).lstrip("-").isdigit():
            key = int(key)
            present = -len(node) <= key < len(node)
        else:
            present = False
        if not present:
            if isinstance(node, ListConfig):
                has = f"it is a list of {len(node)} entries (indices 0..{len(node) - 1})" if len(node) else "it is empty"
            else:
                has = f"it has: {', '.join(str(k) for k in node.keys()) or '(nothing)'}"
            raise ConfigError(
                f"cannot delete {_describe(path)!r}{origin}: {_describe(path[:i])} has no key {str(key)!r}; {has}"
            )
        if i == len(path) - 1:
            if isinstance(node, ListConfig):
                del node[key]
            else:
                node.pop(key)
            return
        node = node._get_node(key) if isinstance(node, DictConfig) else node[key]
        if not isinstance(node, (DictConfig, ListConfig)):
            raise ConfigError(
                f"cannot delete {_describe(path)!r}{origin}: {_describe(path[: i + 1])} is a value, not a mapping or list"
            )


def merge_layers(layers: Sequence[tuple[str, DictConfig]], start: DictConfig | None = None) -> DictConfig:
    """``start`` <- each ``(name, config)`` of ``layers`` in order, with the two rules of the module doc."""
    merged = OmegaConf.create() if start is None else OmegaConf.merge(OmegaConf.create(), start)  # start is not changed
    for name, layer in layers:
        stripped, deletions = _strip_deletions(_plain(layer))
        for path in deletions:
            delete_key(merged, path, source=name)
        drop_replaced_params(merged, stripped)
        merged = OmegaConf.merge(merged, OmegaConf.create(stripped) if deletions else layer)
    return merged
