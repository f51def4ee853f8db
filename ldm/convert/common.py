"""The diffusers converters' error type, checked reader of untrusted JSON configs and parameter maps (each converts
both ways: an export followed by an import gives the same tensors bit for bit)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.checkpoint import CheckpointError, is_int
from ldm.untrusted import clipped_repr

# Bounds on sizes read from an untrusted config, checked before anything is allocated from them.  They are far above
# every released LDM (celebahq: 896 channels, 4 levels, 2 layers, 8192 codes, T = 1000).
MAX_CHANNELS = 16384
MAX_LEVELS = 8
MAX_LAYERS = 32
MAX_CODES = 1 << 20
MAX_SIDE = 1 << 15
MAX_TIMESTEPS = 100_000


class DiffusersFormatError(CheckpointError):
    """A diffusers folder is unreadable or holds something this project cannot represent (the message names what)."""


class Options:
    """The options of one untrusted JSON config, type- and range-checked; ``defaults`` (diffusers') stand in for absent
    keys.  :meth:`finish` refuses keys nobody read (an option that could change the network is never ignored);
    ``_`` keys are metadata and never refused."""

    def __init__(self, data: Mapping[str, Any], source: str, defaults: Mapping[str, Any]):
        self.data = data
        self.source = source
        self.defaults = defaults
        self.read: set[str] = set()

    def fail(self, key: str, value: Any, why: str) -> DiffusersFormatError:
        return DiffusersFormatError(f"{self.source}: {key}={clipped_repr(value)} {why}")

    def get(self, key: str) -> Any:
        self.read.add(key)
        return self.data[key] if key in self.data else self.defaults.get(key)

    def integer(self, key: str, lo: int, hi: int) -> int:
        value = self.get(key)
        if not is_int(value) or not lo <= value <= hi:
            raise self.fail(key, value, f"must be an integer in [{lo}, {hi}]")
        return value

    def number(self, key: str, lo: float, hi: float) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, value, "must be a finite number")
        if not lo <= value <= hi:
            raise self.fail(key, value, f"must be in [{lo:g}, {hi:g}]")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, value, "must be true or false")
        return value

    def choice(self, key: str, allowed: Sequence[Any], why: str = "") -> Any:
        """The value, one of ``allowed`` (equal and of the same type)."""
        value = self.get(key)
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(clipped_repr(a) for a in allowed)
            raise self.fail(key, value, f"is not supported (allowed: {shown}){': ' + why if why else ''}")
        return value

    def block_types(self, key: str, allowed: Sequence[str], why: str) -> tuple[str, ...]:
        value = self.get(key)
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS:
            raise self.fail(key, value, f"must be a list of 1 to {MAX_LEVELS} block names")
        for item in value:
            if item not in allowed:
                raise self.fail(
                    key, value, f"holds {clipped_repr(item)}, which is not supported (allowed: {', '.join(allowed)}): {why}"
                )
        return tuple(value)

    def levels(
        self, down_types: Sequence[str], up_types: Sequence[str], why: tuple[str, str], mirror: str, widths_name: str
    ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """``block_out_channels`` and, per level, whether it has attention (``*_types[1]``; down and up must mirror).
        ``why``: why other block names are refused (down, up); ``widths_name``: CompVis' name for the widths."""
        down = self.block_types("down_block_types", down_types, why[0])
        up = self.block_types("up_block_types", up_types, why[1])
        widths = self.get("block_out_channels")
        ok = isinstance(widths, (list, tuple)) and 1 <= len(widths) <= MAX_LEVELS
        if not ok or not all(is_int(w) and 32 <= w <= MAX_CHANNELS for w in widths):
            raise self.fail(
                "block_out_channels", widths, f"must be a list of 1 to {MAX_LEVELS} integers in [32, {MAX_CHANNELS}]"
            )
        widths = tuple(widths)
        if len(down) != len(widths) or len(up) != len(widths):
            raise self.fail(
                "block_out_channels",
                list(widths),
                f"has {len(widths)} levels but down_block_types has {len(down)} and up_block_types {len(up)}",
            )
        attention = tuple(t == down_types[1] for t in down)
        if tuple(t == up_types[1] for t in reversed(up)) != attention:
            raise self.fail("up_block_types", list(up), f"does not mirror down_block_types {list(down)}: {mirror}")
        if any(w % widths[0] or w % 32 for w in widths):
            raise self.fail(
                "block_out_channels",
                list(widths),
                f"must be multiples of block_out_channels[0] (CompVis' {widths_name}) and of 32 (GroupNorm groups)",
            )
        return widths, attention

    def side(self, key: str) -> int | None:
        """A ``sample_size``: None, an integer or a square ``[h, w]`` pair."""
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if not is_int(value) or not 1 <= value <= MAX_SIDE:
            raise self.fail(key, value, f"must be an integer (or a square [h, w] pair) in [1, {MAX_SIDE}]")
        return value

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def unknown(self) -> list[str]:
        """Keys not read (metadata keys and null values excepted)."""
        return [k for k, v in self.data.items() if k not in self.read and not k.startswith("_") and v is not None]

    def finish(self) -> None:
        left = self.unknown()
        if left:
            raise DiffusersFormatError(
                f"{self.source}: option(s) {left[:5]} are unknown to this converter (written for diffusers 0.42); "
                "it cannot tell whether they change the network, so the folder is refused"
            )


@dataclass(frozen=True)
class ParamMap:
    """One LDM tensor (``ldm``: its key in the LDM sub-model) and the diffusers tensor(s) with the same numbers.

    ``op``: ``copy``; ``squeeze`` (an LDM 1x1 conv ``[O, I, 1(, 1)]`` is a diffusers ``nn.Linear`` ``[O, I]``); ``qkv``
    (the UNet attention's fused 1-D conv ``[3C, C, 1]`` / ``[3C]`` is ``to_q``, ``to_k``, ``to_v``; CompVis' legacy row
    order stacks ``[heads, (q, k, v), head_channels]``, ``new_order`` ``[(q, k, v), heads, head_channels]``).
    """

    ldm: str
    diffusers: tuple[str, ...]
    op: str = "copy"
    heads: int = 1
    new_order: bool = False

    def diffusers_shapes(self, ldm_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """The diffusers tensors' shapes for an LDM tensor of ``ldm_shape`` (computed on the meta device)."""
        return [tuple(t.shape) for t in self.to_diffusers(torch.empty(tuple(ldm_shape), device="meta"))]

    def to_diffusers(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """New contiguous diffusers tensor(s) holding ``tensor``'s values."""
        if self.op == "copy":
            return [tensor.detach().clone().contiguous()]
        if self.op == "squeeze":
            return [tensor.detach().reshape(tensor.shape[:2]).clone().contiguous()]
        rows = tensor.shape[0] // 3
        flat = tensor.detach().reshape(tensor.shape[0], -1)  # [3C, I] (weight) or [3C, 1] (bias)
        if self.new_order:
            parts = flat.reshape(3, rows, -1)
        else:
            parts = flat.reshape(self.heads, 3, rows // self.heads, -1).transpose(0, 1).reshape(3, rows, -1)
        out_shape = (rows, *tensor.shape[1:2])
        return [p.reshape(out_shape).clone().contiguous() for p in parts]

    def to_ldm(self, tensors: Sequence[torch.Tensor], ldm_shape: Sequence[int]) -> torch.Tensor:
        """The LDM tensor of ``ldm_shape``; ``copy``/``squeeze`` return a view of a contiguous input (an import then
        holds each weight once)."""
        shape = tuple(int(s) for s in ldm_shape)
        if self.op in ("copy", "squeeze"):
            return tensors[0].detach().reshape(shape).contiguous()
        rows = shape[0] // 3
        parts = torch.stack([t.detach().reshape(rows, -1) for t in tensors])  # [3, C, I]
        if not self.new_order:
            parts = parts.reshape(3, self.heads, rows // self.heads, -1).transpose(0, 1)
        return parts.reshape(shape).clone().contiguous()


def conv_pair(ldm: str, diffusers: str, bias: bool = True) -> list[ParamMap]:
    """A module whose ``weight`` (and ``bias``) copy unchanged."""
    params = ("weight", "bias") if bias else ("weight",)
    return [ParamMap(f"{ldm}.{p}", (f"{diffusers}.{p}",)) for p in params]


def linear_from_conv1x1(ldm: str, diffusers: str) -> list[ParamMap]:
    """An LDM 1x1 convolution that diffusers holds as ``nn.Linear``."""
    return [ParamMap(f"{ldm}.weight", (f"{diffusers}.weight",), "squeeze"), ParamMap(f"{ldm}.bias", (f"{diffusers}.bias",))]


def refusal(part: str, cls: str) -> Callable[[str], DiffusersFormatError]:
    """``refuse(what)``: the export error for a model's ``part`` that diffusers' ``cls`` cannot hold."""
    return lambda what: DiffusersFormatError(f"the {part} cannot be written as a diffusers {cls}: {what}")


def check_complete(maps: Iterable[ParamMap], ldm_keys: Iterable[str], what: str) -> None:
    """Every LDM key has exactly one map and every map an LDM key (a failure is a bug in the maps)."""
    mapped = [m.ldm for m in maps]
    keys = set(ldm_keys)
    extra = sorted(set(mapped) - keys)
    missing = sorted(keys - set(mapped))
    if extra or missing or len(mapped) != len(set(mapped)):
        raise RuntimeError(
            f"internal error: the {what} key map does not cover the model (unmapped: {missing[:5]}, "
            f"not in the model: {extra[:5]}); please report this with the folder's config.json"
        )
