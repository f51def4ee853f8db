"""Writing a latent cache (the work behind ``scripts/cache_latents.py``; the format is :mod:`ldm.data.latent_format`).

The work is cut into *units*, one output shard each, fixed by the source alone, so that unit ``u`` belongs to rank
``u % world_size`` without communication and a unit's bytes do not depend on the number of processes.  A unit whose
sidecar names a tar of the right size is done, so a killed run resumes."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.captions import CAPTION_EXTS, CAPTION_MEMBER_LIMITS, CaptionError, read_caption_file, sample_caption, sidecar_path
from ldm.data.image_folder import (
    UNREADABLE_IMAGE_ERRORS,
    load_rgb_image,
    resize_short_side,
    scan_image_files,
    split_files,
    uint8_to_model_range,
)
from ldm.data.latent_format import FORMAT, INDEX_NAME, LATENT_EXT, PLAN_NAME, STORAGE_DTYPES, CacheIndex, encode_npy
from ldm.data.tar_shards import (
    IMAGE_EXTS,
    SAMPLE_ERROR_KEY,
    TAR_READ_ERRORS,
    expand_shards,
    is_local,
    iter_samples,
    shard_label,
    write_tar,
)
from ldm.util import TEMP_FILE_PATTERN, ConfigError, atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    """What a cache is made with (all of it goes into ``plan.json``; a resumed run must use the same).  ``source`` is
    a folder of images or a shard pattern; ``split``/``val_fraction``/``split_seed`` as in
    :func:`~ldm.data.image_folder.split_files`; ``batch_size`` images are encoded per call (it decides the encoder's
    exact float results)."""

    source: str
    split: str
    val_fraction: float
    split_seed: int
    size: int
    min_side_resize: bool
    n_crops: int
    flip: bool
    dtype: str
    batch_size: int
    shard_size: int


@dataclass(frozen=True)
class Unit:
    """One output shard: the files (folder source) or the input shard (shard source) it encodes."""

    index: int
    files: tuple[str, ...] = ()
    root: str | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        return f"latents-{self.index:06d}"


def plan_units(settings: CacheSettings, scanned: list[Path] | None = None) -> tuple[list[Unit], str]:
    """The units of ``settings.source`` (runs of ``shard_size`` files of a folder's split, or one per input shard) and a
    sha256 of its item list (to recognise the same source on resume); ``scanned``: the folder's ``scan_image_files`` if
    the caller has it (:func:`source_inputs`)."""
    if os.path.isdir(settings.source):
        root = Path(settings.source)
        files = split_files(
            scan_image_files(root) if scanned is None else scanned, settings.split, settings.val_fraction, settings.split_seed
        )
        if not files:
            raise ConfigError(f"--data {settings.source}: no images (split {settings.split!r}); check the folder")
        items = [f.relative_to(root).as_posix() for f in files]
        n = settings.shard_size
        units = [Unit(i, tuple(items[s : s + n]), root=str(root)) for i, s in enumerate(range(0, len(items), n))]
    else:
        items = expand_shards(settings.source)
        units = [Unit(i, url=url) for i, url in enumerate(items)]
    return units, hashlib.sha256("".join(f"{item}\n" for item in items).encode()).hexdigest()


def plan_document(settings: CacheSettings, sha256: str, latent_shape: tuple[int, ...], units: int, digest: str) -> bytes:
    """The bytes of ``plan.json`` (sorted keys: the same plan gives the same bytes)."""
    plan = {
        "format": FORMAT,
        "settings": vars(settings),
        "first_stage_sha256": sha256,
        "latent_shape": list(latent_shape),
        "units": units,
        "source_digest": digest,
    }
    return (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()


def source_inputs(source: str) -> tuple[list[Path], list[Path] | None]:
    """The local files and folders that ``--data`` reads (a folder and its images, or the local shard files), and the
    folder's scanned image list (None for shards)."""
    if os.path.isdir(source):
        root = Path(source).resolve()
        scanned = scan_image_files(root)
        return [root, *scanned], scanned
    return [Path(url) for url in expand_shards(source) if is_local(url)], None


def check_output_folder(out: Path, inputs: list[Path]) -> None:
    """Refuse (ConfigError, before anything is written) an ``--out`` this run must not write into: one that is or
    holds an input, one with an entry linking to an input, and a non-empty folder without ``plan.json`` (stale temp
    files do not count).  OS errors while looking are left to the writes, which report them as output errors."""
    out_real = Path(os.path.realpath(out))
    real_inputs = {Path(os.path.realpath(p)) for p in inputs}
    # resolved, an output is out_real / name unless the entry is a link: an input at or under out_real is overwritten
    inside = next((p for p in sorted(real_inputs) if p == out_real or out_real in p.parents), None)
    if inside is not None:
        raise ConfigError(
            f"--out {out} would overwrite the input {str(inside)!r} (--out {'is' if inside == out_real else 'holds'} "
            "an input of --data); the cache must go to a folder that holds no input: choose another --out"
        )
    if not out_real.is_dir():
        return  # created later (or refused then, as an output error, when it is a file)
    try:
        with os.scandir(out_real) as entries:
            listing = [(e.name, e.is_symlink()) for e in entries if not TEMP_FILE_PATTERN.match(e.name)]
    except OSError:
        return
    for name, link in listing:
        if link and Path(os.path.realpath(out_real / name)) in real_inputs:
            raise ConfigError(
                f"--out {out}: {name} is a link to the input {os.path.realpath(out_real / name)!r}, which the cache "
                "would replace; remove the link or choose another --out"
            )
    if listing and PLAN_NAME not in {name for name, _ in listing}:
        raise ConfigError(
            f"--out {out} is not empty ({len(listing)} entries, e.g. {min(listing)[0]!r}) and is not a latent cache (it has no "
            f"{PLAN_NAME}); its files would be replaced or mixed with the cache's: choose a new or empty --out folder"
        )


def claim_plan(out: Path, document: bytes) -> None:
    """Write ``plan.json`` into ``out``, or check that the one there is the same (else ConfigError, one line)."""
    path = out / PLAN_NAME
    if path.is_file():
        if path.read_bytes() == document:
            return
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
            ours = json.loads(document)
            diff = sorted(k for k in ours["settings"] if theirs.get("settings", {}).get(k) != ours["settings"][k])
            diff += [k for k in ("first_stage_sha256", "source_digest", "latent_shape") if theirs.get(k) != ours[k]]
        except (ValueError, KeyError, AttributeError):
            diff = ["(unreadable plan.json)"]
        raise ConfigError(
            f"--out {out} holds a cache made with other settings ({', '.join(diff) or 'format'} differ); resume with the "
            "same arguments, or choose a new --out folder"
        )
    atomic_write_bytes(path, document)


def crop_variants(image: Image.Image, settings: CacheSettings) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """uint8 ``[V, size, size, 3]``: ``n_crops`` fixed crops (a cache cannot store training's fresh random crop per
    epoch; 1: the centre crop of ``random_crop: false``, N: evenly spaced along the longer side, centred on the
    shorter), each followed by its mirror image when ``flip``; plus ``[{"top", "left", "flip"}]`` per variant (pixel
    offsets in the resized image)."""
    size = settings.size
    image = resize_short_side(image, size, settings.min_side_resize)
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2  # the centre crop
    if settings.n_crops == 1:
        positions = [(top, left)]
    else:  # evenly spaced along the longer side
        last = settings.n_crops - 1
        spaced = [round(k * (max(width, height) - size) / last) for k in range(settings.n_crops)]
        positions = [(top, s) for s in spaced] if width >= height else [(s, left) for s in spaced]
    arrays, variants = [], []
    for top, left in positions:
        crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
        arrays.append(crop)
        variants.append({"top": top, "left": left, "flip": False})
        if settings.flip:
            arrays.append(np.ascontiguousarray(crop[:, ::-1]))
            variants.append({"top": top, "left": left, "flip": True})
    return np.stack(arrays), variants


def unit_inputs(unit: Unit, skipped: list[dict[str, str]]) -> Iterator[tuple[int, str, Image.Image, str | None]]:
    """``(position, source key, RGB image, caption or None)`` of a unit's readable inputs; the others go to ``skipped``."""
    if unit.url is None:
        for position, name in enumerate(unit.files):
            try:
                caption = read_caption_file(sidecar_path(Path(unit.root) / name))
                yield position, name, load_rgb_image(Path(unit.root) / name), caption
            except (*UNREADABLE_IMAGE_ERRORS, CaptionError) as exc:
                _skip(skipped, name, exc)
        return
    label = shard_label(unit.url)
    position = -1
    try:
        # other members are passed over unread; caption members are refused from their headers when too long
        for sample in iter_samples(unit.url, exts=IMAGE_EXTS + CAPTION_EXTS, member_limits=CAPTION_MEMBER_LIMITS):
            position = sample["__index__"]
            key = f"{label}#{sample['__key__']}"
            if SAMPLE_ERROR_KEY in sample:  # too large to read (a tar bomb), or ambiguous: nothing of it was read
                _skip(skipped, key, ValueError(sample[SAMPLE_ERROR_KEY]))
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                _skip(skipped, key, ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})"))
                continue
            try:
                caption = sample_caption(sample, key)
                yield position, key, load_rgb_image(io.BytesIO(sample[ext])), caption
            except (*UNREADABLE_IMAGE_ERRORS, CaptionError) as exc:
                _skip(skipped, key, exc)
    except TAR_READ_ERRORS as exc:  # nothing after a broken header can be located: the rest of the shard is lost
        lost = "the whole shard" if position < 0 else f"its samples from position {position + 1} on"
        _skip(skipped, f"{label}#({lost}: the shard breaks there)", exc)


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _skip(skipped: list[dict[str, str]], key: str, error: BaseException) -> None:
    message = " ".join(f"{type(error).__name__}: {error}".split())
    # Pillow names an in-memory member by its repr, whose address differs each run: the sidecar keeps its bytes
    message = _OBJECT_REPR.sub("the member", message)
    skipped.append({"source": key, "error": message})
    logger.warning("skipping unreadable input %s (%s)", key, message)


@torch.inference_mode()
def encode_crops(first_stage: torch.nn.Module, crops: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 crops ``[N, H, W, 3]`` -> unscaled float32 latents ``[N, C, h, w]`` (the model's ``encode``), as
    training encodes them (``x / 127.5 - 1``, channels first, contiguous)."""
    x = torch.from_numpy(uint8_to_model_range(crops)).permute(0, 3, 1, 2).contiguous().to(device)
    return first_stage.encode(x).float().cpu().numpy()


def write_unit(
    unit: Unit,
    out: Path,
    first_stage: torch.nn.Module,
    settings: CacheSettings,
    sha256: str,
    device: torch.device,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Encode one unit and write ``<name>.tar`` then its sidecar ``<name>.json`` (which lists unreadable inputs);
    returns the sidecar.  ``advance(n)`` is called after every ``n`` inputs (a progress bar)."""
    dtype = STORAGE_DTYPES[settings.dtype]
    skipped: list[dict[str, str]] = []
    members: list[tuple[str, bytes]] = []
    entries: list[dict[str, Any]] = []
    pending: list[tuple[int, str, np.ndarray, list[dict[str, Any]], str | None]] = []

    def flush() -> None:
        latents = encode_crops(first_stage, np.concatenate([p[2] for p in pending]), device)
        start = 0
        for position, source, batch_crops, variants, caption in pending:
            stack = latents[start : start + len(batch_crops)].astype(dtype)
            start += len(batch_crops)
            key = f"{unit.index:06d}-{position:06d}"
            meta = {"source": source, "variants": variants, "first_stage_sha256": sha256}
            members.append((f"{key}.{LATENT_EXT}", encode_npy(stack)))
            members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            if caption is not None:
                members.append((f"{key}.txt", caption.encode("utf-8")))
            entries.append({"key": key, "source": source})
        advance(len(pending))
        pending.clear()

    seen = 0
    for position, source, image, caption in unit_inputs(unit, skipped):
        crops, variants = crop_variants(image, settings)
        pending.append((position, source, crops, variants, caption))
        seen = position + 1
        if len(pending) == settings.batch_size:
            flush()
    if pending:
        flush()
    advance(max(0, (len(unit.files) if unit.url is None else seen) - len(entries)))
    tar_path = out / f"{unit.name}.tar"
    spans: dict[str, Any] = {}
    atomic_write_bytes(tar_path, lambda fh: spans.update((span.name, span) for span in write_tar(fh, members)))
    for entry in entries:
        npy, txt = spans[f"{entry['key']}.{LATENT_EXT}"], spans.get(f"{entry['key']}.txt")
        entry["offset"], entry["size"] = npy.offset, npy.size
        if txt is not None:
            entry["caption_offset"], entry["caption_size"] = txt.offset, txt.size
    sidecar = {
        "unit": unit.index,
        "tar": tar_path.name,
        "tar_bytes": tar_path.stat().st_size,
        "samples": entries,
        "skipped": skipped,
    }
    atomic_write_bytes(out / f"{unit.name}.json", (json.dumps(sidecar, sort_keys=True) + "\n").encode())
    return sidecar


def read_sidecar(out: Path, unit: Unit) -> dict[str, Any] | None:
    """The sidecar of a finished unit, or None when the unit still has to be (re)done."""
    try:
        sidecar = json.loads((out / f"{unit.name}.json").read_text(encoding="utf-8"))
        if (out / sidecar["tar"]).stat().st_size == int(sidecar["tar_bytes"]) and sidecar["unit"] == unit.index:
            return sidecar
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def write_index_if_complete(
    out: Path, units: list[Unit], settings: CacheSettings, sha256: str, latent_shape: tuple[int, int, int]
) -> CacheIndex | None:
    """Write ``index.json`` when every unit is done (any process may; the bytes are the same); else None."""
    sidecars = [read_sidecar(out, unit) for unit in units]
    if any(s is None for s in sidecars):
        return None
    index = CacheIndex(
        root=out,
        first_stage_sha256=sha256,
        size=settings.size,
        latent_shape=latent_shape,
        dtype=settings.dtype,
        n_crops=settings.n_crops,
        flip=settings.flip,
        shards=tuple((s["tar"], len(s["samples"])) for s in sidecars),
        skipped=sum(len(s["skipped"]) for s in sidecars),
        settings=vars(settings),
        captions=sum("caption_size" in e for s in sidecars for e in s["samples"]),
    )
    atomic_write_bytes(out / INDEX_NAME, (json.dumps(index.to_json(), indent=1, sort_keys=True) + "\n").encode())
    return index
