"""Degradations applied to uint8 arrays and to image folders, with per-file seeds (:func:`file_seed`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm import imageio
from ldm.eval.degrade import Degradation, build_degradation, from_uint8_hwc, to_uint8_hwc
from ldm.util import one_line

logger = logging.getLogger(__name__)


class DegradeFolderError(RuntimeError):
    """One image of a folder could not be degraded (e.g. too small for the degradation)."""


def apply_to_uint8(degradation: Degradation, images: np.ndarray, seed: int | torch.Generator) -> np.ndarray:
    """Apply ``degradation`` to ``uint8`` RGB images ``[H, W, 3]`` or ``[N, H, W, 3]`` (a 4th alpha channel is passed
    through unchanged); returns a ``uint8`` array of the same shape."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected uint8 [H, W, 3|4] or [N, H, W, 3|4], got {arr.dtype} {arr.shape}")
    batch = arr[None] if arr.ndim == 3 else arr
    out = to_uint8_hwc(degradation(from_uint8_hwc(batch[..., :3]), seed))
    if batch.shape[-1] == 4:
        out = np.concatenate([out, batch[..., 3:]], axis=-1)
    return out[0] if arr.ndim == 3 else out


def file_seed(seed: int, relative_path: str) -> int:
    """A 63-bit seed for one file, from the run seed and the file's POSIX path relative to the folder (stable across
    runs, platforms and the other files present)."""
    digest = hashlib.sha256(f"{int(seed)}:{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _resolve(folder: str | os.PathLike, what: str) -> Path:
    """``Path(folder).resolve()``; a symbolic link loop is an ``OSError`` naming the folder, not a ``RuntimeError``."""
    try:
        return Path(folder).resolve()
    except RuntimeError:  # pathlib's "Symlink loop from ..." (Python < 3.13)
        raise OSError(
            f"{what} folder {str(folder)!r} is a symbolic link loop (it leads back to itself); remove the "
            "link or choose another folder"
        ) from None


def degrade_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    degradation: str | Degradation,
    seed: int,
    *,
    on_error: Callable[[str], None] | None = None,
    **params: Any,
) -> list[Path]:
    """Degrade every image under ``src`` into ``dst`` as PNG, keeping the relative layout (``a/b.jpg`` -> ``a/b.png``).

    ``degradation`` is a registry name (built with ``params``) or a :class:`Degradation` (then ``params`` must be
    empty).  An alpha channel is kept unchanged; each file is seeded by ``file_seed(seed, relative_path)`` and written
    atomically with the PNG text keys ``degradation`` (its spec) and ``degradation_seed``.  Returns the written paths.

    Raises, before any image is written: FileNotFoundError (no such folder, no images), OSError (a symbolic link loop),
    ValueError (``dst`` inside ``src``, an output that would land on an input or inside ``src``, two sources mapping to
    one output).  Then :class:`ldm.imageio.ImageLoadError` for an unreadable image and :class:`DegradeFolderError` for
    an image the degradation refuses; with ``on_error``, those two are passed to it (one line each) and the rest go on.
    """
    src_root, dst_root = _resolve(src, "source"), _resolve(dst, "output")
    if not src_root.is_dir():
        raise FileNotFoundError(f"source folder {str(src_root)!r} does not exist or is not a folder")
    if dst_root == src_root or src_root in dst_root.parents:
        raise ValueError(
            f"output folder {str(dst_root)!r} must not be the source folder {str(src_root)!r} or inside it (outputs "
            "would mix with inputs); choose an output folder elsewhere"
        )
    if isinstance(degradation, Degradation):
        if params:
            raise TypeError(f"params {sorted(params)} given with an already built {degradation!r}; pass a name instead")
        deg = degradation
    else:
        deg = build_degradation(degradation, **params)
    files, problems = imageio.find_images([src_root])
    if not files:
        raise FileNotFoundError("; ".join(problems) or f"no images under {str(src_root)!r}")
    targets: dict[Path, Path] = {}
    inputs = {os.path.realpath(path): path for path in files}
    for path in files:
        out = (dst_root / path.relative_to(src_root)).with_suffix(".png")
        if out in targets:
            raise ValueError(f"{targets[out]} and {path} would both be written to {out}; rename one of them")
        _check_not_an_input(out, path, src_root, inputs)
        targets[out] = path
    written: list[Path] = []
    for out, path in targets.items():
        this_seed = file_seed(seed, path.relative_to(src_root).as_posix())
        try:
            loaded = imageio.load_image(path)
        except imageio.ImageLoadError as exc:
            if on_error is None:
                raise
            on_error(str(exc))
            continue
        try:
            result = deg(imageio.image_to_tensor(loaded.rgb), this_seed)
        except (ValueError, RuntimeError) as exc:
            size = f"{loaded.rgb.shape[1]}x{loaded.rgb.shape[0]} px"
            why = f"{deg.spec} cannot degrade {str(path)!r} ({size}): " + one_line(exc)
            if on_error is not None:
                on_error(why)
                continue
            raise DegradeFolderError(
                f"{why}; {len(written)} of {len(targets)} images were written to {str(dst_root)!r} before it"
            ) from exc
        metadata = {"degradation": deg.spec, "degradation_seed": str(this_seed)}
        imageio.save_image_atomic(out, imageio.tensor_to_image(result), alpha=loaded.alpha, metadata=metadata)
        written.append(out)
    logger.info("degraded %d images from %s into %s with %s (seed %d)", len(targets), src_root, dst_root, deg.spec, seed)
    return written


def _check_not_an_input(out: Path, source: Path, src_root: Path, inputs: dict[str, Path]) -> None:
    """ValueError when writing ``out`` (the output of ``source``) would replace an input image (``inputs``: by real path)
    or put a file inside ``src_root`` (an output folder above the source maps ``src/<name>/x.png`` onto ``src/x.png``
    when the source holds a subfolder of its own name).  ``out``'s folder is resolved: a link may lead into the source."""
    where = Path(os.path.realpath(out.parent)) / out.name
    overwritten = inputs.get(str(where))
    if overwritten is None and src_root not in where.parents:
        return
    what = "over the input image " + repr(str(overwritten)) + " of" if overwritten is not None else "inside"
    raise ValueError(
        f"the output of {str(source)!r} would be written to {str(where)!r}, {what} the source folder {str(src_root)!r}; "
        "inputs are never modified nor mixed with outputs: choose an output folder that does not contain the source folder"
    )
