"""Training data streamed from webdataset tar shards on many processes: :class:`ImageShards`, :class:`LatentShards`,
served through :class:`ShardStreamLoader` (each rank reads only its part).  The epoch plan: :class:`ShardStream`."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ldm.data import captions as cap
from ldm.data.image_folder import (
    UNREADABLE_IMAGE_ERRORS,
    EpochSeededDataset,
    UnreadableDatasetError,
    augment_image,
    load_rgb_image,
    uint8_to_model_range,
)
from ldm.data.latent_format import INDEX_NAME, LATENT_EXT, choose_variant, decode_npy, latent_item, read_index
from ldm.data.resumable import ResumableLoaderState, derive_seed
from ldm.data.tar_shards import (
    IMAGE_EXTS,
    MAX_SHARD_SAMPLES,
    SAMPLE_ERROR_KEY,
    TAR_READ_ERRORS,
    count_samples,
    expand_shards,
    iter_samples,
    shard_label,
)
from ldm.util import ConfigError, one_line

logger = logging.getLogger(__name__)

_SKIP_SLOTS = 64  # per-worker counters of unreadable samples in shared memory
MAX_JSON_BYTES = cap.MAX_CAPTION_JSON_BYTES
# LatentShards over a pattern (no index.json): the latent shape is the most common one among this many first samples
_SHAPE_PROBE_SAMPLES = 16


@dataclass
class _EpochState:
    """What a worker's epoch learnt, so that nothing unreadable is read twice: ``ends`` (shard -> position where its
    readable part ends), ``empty`` blocks, ``substitute`` (empty block -> the block standing in), ``cached`` (the last
    substitute block and its items)."""

    ends: dict[int, int] = field(default_factory=dict)
    empty: set[int] = field(default_factory=set)
    substitute: dict[int, int] = field(default_factory=dict)
    cached: tuple[int, list[Any]] | None = None


class ShardStream(IterableDataset, EpochSeededDataset):
    """Base class: the epoch plan below over ``shards``; subclasses decode samples.

    Plan of epoch ``e``, the same on every process (it needs each shard's sample count, see ``sizes``):

    1. Shards in a permutation seeded by ``(seed, e)`` (training), else as given, form the epoch's ``N`` samples.
    2. Rank ``r`` of ``R`` gets the contiguous samples ``[r M, (r + 1) M)``, ``M = N // R``; training takes
       ``M // batch_size`` whole batches, validation ``ceil(M / batch_size)``.  Every rank runs the same number of
       steps, so none waits forever in a collective.
    3. The rank's batches are split among its ``W`` workers in contiguous runs; the DataLoader hands worker batches out
       round robin, so rank batch ``j`` is batch ``j // W`` of worker ``j % W``.
    4. A worker reads its run in blocks of ``shuffle_buffer`` samples (rounded up to whole batches) and permutes a
       block with a generator seeded by ``(seed, e, rank, worker, block)`` (training).  A loader restarted at batch
       ``k`` re-reads only the block that holds it.  Memory per worker: one block of decoded samples.

    A sample's crop/flip (or stored variant) comes from ``numpy.random.default_rng([seed, e, g])``, ``g`` its position
    in the shard list as given: independent of ranks and workers.

    Unreadable data: a sample that fails to decode, or is missing because its shard is damaged or shorter than its
    count, is replaced by a readable sample of the same block (cycling), warned about and counted (:attr:`num_skipped`);
    a block without a readable sample takes the next readable block's.  Where a shard ends early or breaks is remembered
    for the epoch (one warning).  A local shard that cannot be opened when counting is left out (``skipped_shards``).

    ``shards``: brace pattern(s) of tar shards, or a list of them; ``sizes``: a JSON file ``{shard file name or URL:
    samples}``, or None to count local shards by their tar headers at construction.
    """

    captions = "off"  # subclasses with captions set theirs
    decode_errors: tuple[type[BaseException], ...] = (KeyError, ValueError)  # what decode raises for unreadable samples
    member_exts: tuple[str, ...] | None = None  # the member extensions decode uses (None: all); others are not read
    _index_counts: list[int] | None = None  # sample counts known from a cache's index.json (LatentShards)

    def __init__(
        self, shards: str | Sequence[str], sizes: str | os.PathLike | None = None, seed: int = 0, shuffle_buffer: int = 1000
    ) -> None:
        EpochSeededDataset.__init__(self, seed)
        if int(shuffle_buffer) < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be a positive number of samples")
        self.urls = expand_shards(shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.counts, self.skipped_shards = self._shard_sizes(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._skip_batches = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skipped = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_()
        self.batch_size, self.rank, self.world_size, self.shuffle, self.drop_last = 1, 0, 1, False, False
        logger.info("%s: %d samples in %d shards", type(self).__name__, len(self), len(self.urls))

    def _shard_sizes(self, sizes: str | os.PathLike | None) -> tuple[list[int], list[str]]:
        if self._index_counts is not None and sizes is None:
            return list(self._index_counts), []
        if sizes is not None:
            try:
                table = json.loads(Path(sizes).read_text(encoding="utf-8"))
                counts = [table.get(u, table.get(Path(u).name)) for u in self.urls]
            except (OSError, ValueError, AttributeError, RecursionError) as exc:  # RecursionError: deep nesting
                raise ConfigError(f"sizes={sizes}: not a JSON object {{shard name: samples}} ({exc})") from exc
            bad = [u for u, c in zip(self.urls, counts) if type(c) is not int or c < 0]  # bool is no count
            if bad:
                raise ConfigError(f"sizes={sizes} has no sample count (a non-negative integer) for {bad[0]!r}")
            # huge counts would overflow the int64 offsets into a negative len()
            huge = [(u, c) for u, c in zip(self.urls, counts) if c > MAX_SHARD_SAMPLES]
            if huge:
                raise ConfigError(
                    f"sizes={sizes} gives {huge[0][0]!r} {huge[0][1]:,} samples, more than the {MAX_SHARD_SAMPLES:,} a "
                    "shard may hold; fix the count (or delete the file to count local shards from their tar headers)"
                )
            return counts, []
        counts, skipped = [], []
        for url in self.urls:
            try:
                counts.append(count_samples(url))
            except TAR_READ_ERRORS as exc:
                logger.warning("leaving out unreadable shard %s (%s: %s)", url, type(exc).__name__, exc)
                counts.append(0)
                skipped.append(url)
        return counts, skipped

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_skipped(self) -> int:
        """Unreadable samples met so far by this dataset's iterators (all workers)."""
        return int(self._skipped.sum().item())

    def configure(self, batch_size: int, rank: int, world_size: int, shuffle: bool, drop_last: bool) -> None:
        """Set the batch size and this process's place (called by the data module before building the loader)."""
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(self)} samples give {len(self) // world_size} per rank on {world_size} rank(s), fewer than "
                f"batch_size={batch_size}; lower batch_size or add shards"
            )

    def samples_per_rank(self) -> int:
        """Samples each rank reads per epoch (the same on every rank)."""
        return len(self) // self.world_size

    def num_batches(self) -> int:
        """Batches per rank and epoch (equal on every rank)."""
        per_rank = self.samples_per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def worker_runs(self, num_workers: int) -> list[tuple[int, int, int]]:
        """``(first sample, samples, batches)`` of each worker's run, in the rank's part of the epoch stream."""
        total = self.num_batches()
        remainder = self.samples_per_rank() % self.batch_size if not self.drop_last else 0
        runs, start = [], self.rank * self.samples_per_rank()
        for worker in range(num_workers):
            batches = total // num_workers + (worker < total % num_workers)
            length = batches * self.batch_size
            if remainder and batches and worker == (total - 1) % num_workers:
                length -= self.batch_size - remainder  # the rank's last (partial) batch is this worker's last
            runs.append((start, length, batches))
            start += length
        return runs

    def decode(self, sample: dict[str, Any], index: int, rng: np.random.Generator) -> dict[str, Any]:
        """One raw sample (``{ext: bytes}``) -> the training item; ``index`` is its global position."""
        raise NotImplementedError

    def _read(
        self, order: np.ndarray, start: int, stop: int, epoch: int, state: _EpochState, count: bool = True
    ) -> list[dict[str, Any]]:
        """Decoded items of stream samples ``[start, stop)``; unreadable and missing ones are counted unless ``count``
        is false (a block read again to stand in for another).  Where a shard ends early goes into ``state``."""
        ends = np.cumsum(np.asarray(self.counts, dtype=np.int64)[order])
        # caption members are refused from their tar headers above their size limits
        limits = None if self.captions == "off" else cap.CAPTION_MEMBER_LIMITS
        items = []
        position = start
        while position < stop:
            slot = int(np.searchsorted(ends, position, side="right"))
            shard = int(order[slot])
            label = shard_label(self.urls[shard])
            within = position - int(ends[slot] - self.counts[shard])
            n = min(stop, int(ends[slot])) - position
            position += n
            readable = min(n, max(0, state.ends.get(shard, within + n) - within))
            got, error = 0, None
            if readable:
                try:
                    for sample in iter_samples(
                        self.urls[shard], skip=within, limit=readable, exts=self.member_exts, member_limits=limits
                    ):
                        got += 1
                        index = int(self.offsets[shard]) + sample["__index__"]
                        try:
                            if SAMPLE_ERROR_KEY in sample:  # e.g. a member too large to read, or two of a name
                                raise ValueError(sample[SAMPLE_ERROR_KEY])
                            items.append(self.decode(sample, index, self.item_rng(index, epoch)))
                        except self.decode_errors as exc:
                            if count:
                                self._skip(f"{label}#{sample['__key__']}", exc)
                except TAR_READ_ERRORS as exc:
                    error = exc
            if got < readable:  # found the shard's end (or the place it breaks): warned about once per epoch
                state.ends[shard] = within + got
                if count:
                    self._skip(
                        f"{label} samples {within + got}..{within + n - 1}",
                        error
                        or EOFError(
                            f"the shard ends before sample {within + got}, but its count says {self.counts[shard]}; "
                            "the missing samples are replaced by others and counted as skipped, without a warning "
                            "for each, in every epoch: fix the count (sizes / index.json)"
                        ),
                        n - got,
                    )
            elif got < n and count:  # the rest lies past an end found before: counted, not warned about again
                self._skip(label, EOFError(), n - got, warn=False)
        return items

    def _skip(self, where: str, error: BaseException, count: int = 1, warn: bool = True) -> None:
        info = get_worker_info()
        self._skipped[(info.id if info else 0) % _SKIP_SLOTS] += count
        if warn:
            logger.warning(
                "skipping unreadable %s (%s: %s); %d sample(s) skipped so far",
                where,
                type(error).__name__,
                one_line(error),
                self.num_skipped,
            )

    def _block_span(self, run: tuple[int, int, int], block: int) -> tuple[int, int]:
        """Stream samples ``[lo, hi)`` of block ``block`` of a worker's ``run``."""
        start, length, _ = run
        lo = start + block * self._block_samples()
        return lo, min(lo + self._block_samples(), start + length)

    def _block(
        self, order: np.ndarray, run: tuple[int, int, int], block: int, epoch: int, worker: int, state: _EpochState
    ) -> list[Any]:
        lo, hi = self._block_span(run, block)
        items = self._read(order, lo, hi, epoch, state)
        if not items:
            state.empty.add(block)
            items = self._substitute(order, run, block, epoch, state)
        items = [items[i % len(items)] for i in range(hi - lo)]
        if self.shuffle:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, worker, block))
            items = [items[i] for i in rng.permutation(hi - lo)]
        return items

    def _substitute(
        self, order: np.ndarray, run: tuple[int, int, int], block: int, epoch: int, state: _EpochState
    ) -> list[Any]:
        """The items of the first readable block after ``block`` (cyclically) in the worker's run: a function of the
        data alone, so a resumed epoch substitutes as the uninterrupted one did.  Every empty block passed remembers
        the substitute and its items are kept, so a long unreadable stretch costs one read per block."""
        start, length, _ = run
        n_blocks = math.ceil(length / self._block_samples())
        found = state.substitute.get(block)
        if found is None:
            passed = [block]
            for k in range(1, n_blocks):
                b = (block + k) % n_blocks
                if b in state.substitute:  # an empty stretch whose substitute is known (after a wrap-around)
                    found = state.substitute[b]
                    break
                if b not in state.empty:
                    items = self._read(order, *self._block_span(run, b), epoch, state, count=False)
                    if items:
                        found, state.cached = b, (b, items)
                        break
                    state.empty.add(b)
                passed.append(b)
            else:
                raise UnreadableDatasetError(
                    f"no readable sample in samples {start}..{start + length - 1} of epoch {epoch} (rank {self.rank}); "
                    f"check the shards {[shard_label(self.urls[i]) for i in order[:3]]}..."
                )
            state.substitute.update(dict.fromkeys(passed, found))
        if state.cached is None or state.cached[0] != found:
            state.cached = (found, self._read(order, *self._block_span(run, found), epoch, state, count=False))
        return state.cached[1]

    def _block_samples(self) -> int:
        return math.ceil(self.shuffle_buffer / self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.epoch, int(self._skip_batches.item())
        # the DataLoader's round robin starts at its worker 0: after skipping k batches, rank batch k (of worker k % W in
        # the plan) must come from DataLoader worker 0, so DataLoader worker i serves the plan's worker (i + k) % W
        worker = (loader_worker + skip) % workers
        run = self.worker_runs(workers)[worker]
        local_skip = max(0, (skip - worker + workers - 1) // workers)
        if local_skip >= run[2]:
            return
        # shard ids in the order of the epoch's stream
        shards = len(self.urls)
        order = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(shards) if self.shuffle else np.arange(shards)
        per_block = self._block_samples() // self.batch_size
        first = local_skip // per_block
        state = _EpochState()
        for block in range(first, math.ceil(run[2] / per_block)):
            items = self._block(order, run, block, epoch, worker, state)
            batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
            for batch in batches[local_skip % per_block if block == first else 0 :]:
                yield default_collate(batch)


class ImageShards(ShardStream):
    """Images from tar shards (members ``.jpg .jpeg .png .webp .bmp``), transformed as ImageFolderDataset does.

    ``size``, ``random_crop``, ``flip``, ``min_side_resize`` as in :class:`~ldm.data.image_folder.ImageFolderDataset`
    (set ``random_crop``/``flip`` false for validation); ``captions`` as in :mod:`ldm.data.captions` (a required one
    missing makes the sample unreadable).  Items: ``{image_key: float32 [size, size, 3] in [-1, 1], "file_path_": key}``
    (+ ``"caption"``).
    """

    decode_errors = (KeyError, *UNREADABLE_IMAGE_ERRORS)

    def __init__(
        self,
        shards: str | Sequence[str],
        size: int = 256,
        sizes: str | os.PathLike | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        random_crop: bool = True,
        flip: bool = True,
        min_side_resize: bool = True,
        image_key: str = "image",
        captions: str = "off",
    ) -> None:
        if int(size) < 1:
            raise ValueError(f"size={size} must be a positive number of pixels")
        self.captions = cap.check_caption_mode(captions)
        self.size, self.random_crop, self.flip = int(size), bool(random_crop), bool(flip)
        self.min_side_resize, self.image_key = bool(min_side_resize), image_key
        self.member_exts = IMAGE_EXTS if self.captions == "off" else IMAGE_EXTS + cap.CAPTION_EXTS
        super().__init__(shards, sizes, seed, shuffle_buffer)

    def decode(self, sample: dict[str, Any], index: int, rng: np.random.Generator) -> dict[str, Any]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise KeyError(f"no image member ({'/'.join(IMAGE_EXTS)}) in sample with {sorted(sample)}")
        name = f"{shard_label(sample['__url__'])}#{sample['__key__']}"
        caption = {} if self.captions == "off" else cap.caption_item(cap.sample_caption(sample, name), self.captions, name)
        image = load_rgb_image(io.BytesIO(sample[ext]))
        array = augment_image(image, self.size, self.min_side_resize, self.random_crop, self.flip, rng)
        return {self.image_key: uint8_to_model_range(array), "file_path_": name, **caption}


class LatentShards(ShardStream):
    """Cached latents (``scripts/cache_latents.py``) streamed from their shards.

    ``shards`` may be the cache folder (its ``index.json`` gives the shards, their sizes and the latent shape) or a
    pattern of its shards (then ``sizes`` or local files, and the shape is the most common among the first samples);
    ``flip``, ``random_crop``, ``captions`` and items as :class:`~ldm.data.cached_latents.CachedLatents` (``auto``
    follows the cache folder's index; give a pattern of shards ``optional``/``required``).

    A sample is skipped (counted) unless it is exactly what the cache declares: metadata a JSON object of at most
    ``MAX_JSON_BYTES`` whose variants match the array one to one (crops in order, each followed by its mirror image
    when flips are stored), and a finite array of the cache's shape ``[V, C, h, w]``.
    """

    decode_errors = (KeyError, ValueError, TypeError)

    def __init__(
        self,
        shards: str | Sequence[str],
        sizes: str | os.PathLike | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        flip: bool = True,
        random_crop: bool = True,
        captions: str = "auto",
    ) -> None:
        self.flip, self.random_crop = bool(flip), bool(random_crop)
        self.captions = cap.cache_caption_mode(captions, None)
        self.sample_shape: tuple[int, ...] | None = None  # [V, C, h, w]: variants and latent shape
        if isinstance(shards, str) and os.path.isfile(os.path.join(shards, INDEX_NAME)):
            index = read_index(shards)
            self.sample_shape = (index.variants, *index.latent_shape)
            self._index_counts = [count for _, count in index.shards]
            shards = index.shard_paths()
            self.captions = cap.cache_caption_mode(captions, index.captions)
        self.member_exts = (LATENT_EXT, "json") if self.captions == "off" else (LATENT_EXT, "json", "txt")
        super().__init__(shards, sizes, seed, shuffle_buffer)
        if self.sample_shape is None:
            self.sample_shape = self._probe_shape()

    def _probe_shape(self) -> tuple[int, ...]:
        """``[V, C, h, w]`` of shards without an index: the most common shape among their first readable samples
        (so that one odd sample does not decide the shape every other one must have)."""
        shapes: Counter[tuple[int, ...]] = Counter()
        for url, count in zip(self.urls, self.counts):
            if count == 0:
                continue
            try:
                for sample in iter_samples(url, limit=_SHAPE_PROBE_SAMPLES - sum(shapes.values()), exts=(LATENT_EXT,)):
                    try:
                        array = decode_npy(sample[LATENT_EXT], what=f"sample {sample['__key__']}")
                    except (KeyError, ValueError):
                        continue
                    if array.ndim == 4:
                        shapes[tuple(array.shape)] += 1
            except TAR_READ_ERRORS as exc:
                logger.warning("cannot read %s to learn the latent shape (%s: %s)", shard_label(url), type(exc).__name__, exc)
            if sum(shapes.values()) >= _SHAPE_PROBE_SAMPLES:
                break
        if not shapes:
            raise UnreadableDatasetError(
                f"no readable latent [variants, C, h, w] among the first samples of the shards "
                f"{[shard_label(u) for u in self.urls[:3]]}...; pass the cache folder (it holds index.json) or check "
                "the shards"
            )
        shape, _ = shapes.most_common(1)[0]
        logger.info("LatentShards: samples are %s (the most common shape of the first %d)", shape, sum(shapes.values()))
        return shape

    def _metadata(self, raw: bytes, key: str) -> tuple[int, bool, str, str]:
        """``(n_crops, stored_flip, first_stage_sha256, source)`` of a sample's JSON, checked against the cache's
        variant count: ``choose_variant`` indexes the array with what this says, so a lie must not get through."""
        if len(raw) > MAX_JSON_BYTES:
            raise ValueError(f"metadata of {len(raw)} bytes is larger than {MAX_JSON_BYTES}")
        try:
            meta = json.loads(raw)
        except RecursionError:  # nesting deep enough to exhaust the parser's stack, small enough for the size limit
            raise ValueError(f"sample {key}: metadata nests deeper than a JSON parser can follow") from None
        n_variants = self.sample_shape[0]
        if not isinstance(meta, dict) or not isinstance(meta.get("variants"), list):
            raise ValueError(f"sample {key}: metadata is not an object with a list of variants")
        variants = meta["variants"]
        if len(variants) != n_variants:
            raise ValueError(f"sample {key}: metadata lists {len(variants)} variants but the cache stores {n_variants}")
        for v in variants:
            if not (
                isinstance(v, dict) and type(v.get("top")) is int and type(v.get("left")) is int and type(v.get("flip")) is bool
            ):
                raise ValueError(f"sample {key}: a variant is not {{top: int, left: int, flip: bool}} ({str(v)[:80]})")
        stored_flip = any(v["flip"] for v in variants)
        per_crop = 2 if stored_flip else 1
        crops = [(v["top"], v["left"]) for v in variants[::per_crop]]
        # variant i is crop i // per_crop, the mirror image when i is odd and flips are stored (latent_format's layout)
        layout = all(
            (v["top"], v["left"]) == crops[i // per_crop] and v["flip"] == (stored_flip and i % 2 == 1)
            for i, v in enumerate(variants)
        )
        if n_variants % per_crop or not layout:
            raise ValueError(
                f"sample {key}: its {n_variants} variants are not crops in order"
                f"{', each followed by its mirror image' if stored_flip else ''}"
            )
        sha, source = meta.get("first_stage_sha256"), meta.get("source")
        if not isinstance(sha, str) or not isinstance(source, str):
            raise ValueError(f"sample {key}: metadata lacks the strings first_stage_sha256 and source")
        # distinct positions: crops of an image no longer than the crop coincide, and a draw among fewer crops stays
        # inside the array
        return len(set(crops)), stored_flip, sha, source

    def decode(self, sample: dict[str, Any], index: int, rng: np.random.Generator) -> dict[str, Any]:
        what = f"sample {sample['__key__']}"
        n_crops, stored_flip, sha, source = self._metadata(sample["json"], sample["__key__"])
        array = decode_npy(sample[LATENT_EXT], self.sample_shape, what=what)
        variant = choose_variant(rng, n_crops, stored_flip, self.random_crop, self.flip)
        caption = cap.caption_item(cap.sample_caption(sample, what), self.captions, what).get("caption")  # the .txt member
        return latent_item(array, variant, sha, source, caption)


class ShardStreamLoader(ResumableLoaderState, DataLoader):
    """The loader of a :class:`ShardStream` for one rank: batches come from the dataset's workers (``batch_size=None``);
    ``len()`` is the number of batches per rank; resumable mid-epoch; ``make_resumable`` leaves it as it is."""

    splits_by_rank = True

    def __init__(self, dataset: ShardStream, **loader_kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **loader_kwargs)

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def _epoch_now(self) -> int:
        return self.dataset.epoch

    def _start_epoch(self) -> Iterator[Any]:
        # the rank's batches to skip, in shared memory: read by the workers when they start
        self.dataset._skip_batches.fill_(self._resume_skip("re-reading only the block that holds it"))
        return DataLoader.__iter__(self)
