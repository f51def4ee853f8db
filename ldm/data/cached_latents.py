"""``CachedLatents``: a map-style dataset over a latent cache (``scripts/cache_latents.py``), read by the byte spans
its shards' sidecars record (no tar scan)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ldm.data.captions import MAX_CAPTION_BYTES, cache_caption_mode, caption_item, decode_caption
from ldm.data.image_folder import EpochSeededDataset, UnreadableDatasetError
from ldm.data.latent_format import CacheIndex, choose_variant, decode_npy, latent_item, read_index
from ldm.data.tar_shards import MAX_MEMBER_BYTES, read_span
from ldm.util import ConfigError, one_line

logger = logging.getLogger(__name__)


class CachedLatents(EpochSeededDataset):
    """The samples of a latent cache (shards in index order), one stored variant per item and epoch: a cache of centre
    crops with flips, read with the image dataset's ``seed``, yields the latents of exactly the crops
    ``ImageFolderDataset(random_crop=False)`` yields.  An unreadable sample is warned about once and replaced by the
    next readable one.

    Args:
        seed: seed of the variant draws (use the image dataset's ``seed`` to reproduce its flips).
        flip, random_crop: use the stored flipped variants (p = 0.5) / draw among the stored crops (else the middle one).
        captions: ``auto`` (``optional`` when the cache holds captions, else ``off``), ``off``, ``optional`` or
            ``required`` (checked at construction).

    Items: ``{cached_latent: float32 [C, h, w] (unscaled), first_stage_sha256: str, file_path_: source}``, plus
    ``caption: str`` when captions are on.
    """

    def __init__(
        self, root: str | os.PathLike, seed: int = 0, flip: bool = True, random_crop: bool = True, captions: str = "auto"
    ) -> None:
        super().__init__(seed)
        self.index: CacheIndex = read_index(root)
        self.flip = bool(flip)
        self.random_crop = bool(random_crop)
        self.captions = cache_caption_mode(captions, self.index.captions)
        rows, sources = [], []
        for shard_id, (name, count) in enumerate(self.index.shards):
            path = self.index.root / name
            sidecar_path = path.with_suffix(".json")
            try:
                sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
                samples = sidecar["samples"]
                tar_bytes = int(sidecar["tar_bytes"])
                spans = [(int(s["offset"]), int(s["size"]), str(s["source"])) for s in samples]
                # (-1, 0): no caption; a caption span outside the tar is refused below, as a latent's is
                captioned = [(int(s.get("caption_offset", -1)), int(s.get("caption_size", 0))) for s in samples]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: a non-object entry
                raise ConfigError(f"{sidecar_path}: unreadable shard sidecar ({type(exc).__name__}: {exc})") from exc
            actual = path.stat().st_size if path.is_file() else -1
            extents = [(o, s) for o, s, _ in spans] + [(o, s) for o, s in captioned if o >= 0]
            if len(spans) != count or actual != tar_bytes or any(o < 0 or s < 0 or o + s > tar_bytes for o, s in extents):
                raise ConfigError(
                    f"{path} does not match {sidecar_path} and index.json (samples {len(spans)} vs {count}, bytes "
                    f"{actual} vs {tar_bytes}); the cache was modified: re-run cache_latents.py into a new folder"
                )
            rows += [(shard_id, o, s, *c) for (o, s, _), c in zip(spans, captioned)]
            sources += [src for _, _, src in spans]
        if not sources:
            raise ConfigError(f"latent cache {self.index.root} holds no samples ({self.index.skipped} inputs were unreadable)")
        # per sample: shard, offset, size, caption offset, caption size
        self._span = np.asarray(rows, dtype=np.int64)
        self._sources = sources
        uncaptioned = self._span[:, 3] < 0
        if self.captions == "required" and uncaptioned.any():
            first = int(np.flatnonzero(uncaptioned)[0])
            raise ConfigError(
                f"captions='required', but {int(uncaptioned.sum())} of the {len(sources)} samples of "
                f"the latent cache {self.index.root} have no caption (first: {sources[first]!r}); cache a source with "
                "captions, or set captions: optional (the empty caption for those)"
            )
        self._paths = self.index.shard_paths()
        self._shape = (self.index.variants, *self.index.latent_shape)
        self._bad = torch.zeros(len(sources), dtype=torch.uint8).share_memory_()
        logger.info("CachedLatents %s: %d samples in %d shards", self.index.root, len(sources), len(self._paths))

    def __len__(self) -> int:
        return len(self._sources)

    @property
    def num_skipped(self) -> int:
        """Samples found unreadable so far (each warned about once, never retried)."""
        return int(self._bad.sum().item())

    def load(self, position: int) -> tuple[np.ndarray, str | None] | None:
        """The stored variants ``[V, C, h, w]`` of sample ``position`` and its caption (None when captions are off;
        ``""`` for none), or None (marked, warned once) if either is unreadable."""
        if self._bad[position].item():
            return None
        shard, offset, size, at, length = (int(v) for v in self._span[position])
        path = self._paths[shard]
        what = f"{Path(path).name} sample {self._sources[position]}"
        try:
            if size > MAX_MEMBER_BYTES:  # the sidecar's size is read whole: bound it as tar members are
                raise ValueError(
                    f"{what}: its sidecar gives {size:,} bytes, more than the {MAX_MEMBER_BYTES:,} a sample member may have"
                )
            caption = None
            if self.captions != "off":
                if length > MAX_CAPTION_BYTES:  # bounded before it is read, as a caption member of a shard is
                    raise ValueError(
                        f"{what}: its sidecar gives a caption of {length:,} bytes, more than the {MAX_CAPTION_BYTES:,} allowed"
                    )
                text = decode_caption(read_span(path, at, length), what) if at >= 0 else None
                caption = caption_item(text, self.captions, what)["caption"]
            return decode_npy(read_span(path, offset, size), self._shape, what=what), caption
        except (OSError, EOFError, ValueError) as exc:
            self._bad[position] = 1
            logger.warning(
                "skipping unreadable cached latent (%s); substituting another sample (%d unreadable so far)",
                one_line(exc),
                self.num_skipped,
            )
            return None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        n = len(self)
        index = self._wrap_index(index, n, f"{n} cached latents")
        for offset in range(n):
            position = (index + offset) % n
            loaded = self.load(position)
            if loaded is not None:
                array, caption = loaded
                variant = choose_variant(self.item_rng(index), self.index.n_crops, self.index.flip, self.random_crop, self.flip)
                return latent_item(array, variant, self.index.first_stage_sha256, self._sources[position], caption)
        raise UnreadableDatasetError(f"all {n} samples of the latent cache {self.index.root} are unreadable")
