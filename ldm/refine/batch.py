"""Refining image files in a batch (``scripts/refine.py``): naming, skipping, batching, metadata, per-file errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.cli import one_line_error
from ldm.imageio import (
    ImageLoadError,
    ImageSaveError,
    find_images,
    format_path,
    image_to_tensor,
    load_image,
    save_image_atomic,
    side_by_side,
    tensor_to_image,
)
from ldm.imageio.prompt import Prompt, PromptError, read_png_text
from ldm.refine.conditioning import text_experts, unguided_experts
from ldm.refine.first_stage import describe_tiling
from ldm.refine.refiner import Refiner
from ldm.refine.regions import RegionOptions, load_mask, mask_overlay, region_crops, region_metadata
from ldm.refine.request import RefineRequest
from ldm.sampling import RefinePlan
from ldm.util import LONGEST_ATOMIC_NAME, is_rank_zero, one_line, remove_stale_temp_files

logger = logging.getLogger(__name__)

SOFTWARE = "latesteps refine"


@dataclass
class BatchReport:
    """Outcome of :func:`refine_files`: ``done`` inputs (every output exists), ``written`` and ``skipped`` outputs,
    ``failed`` ``(printable input, one-line reason)``, ``fatal``: one line when an output-folder error stopped the batch."""

    done: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.fatal is None


@dataclass
class _Item:  # one sample of one input waiting to be refined
    source: int  # index into the input list
    sample: int
    seed: int
    out: Path
    x: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    alpha: np.ndarray | None
    start_map: torch.Tensor | None  # [1, 1, H, W] timesteps, or None for the whole image
    region_meta: dict[str, str]
    prompt: Prompt | None = None


def output_name(stem: str, start_t: int, seed: int, sample: int | None = None) -> str:
    """``<stem>_t<start_t>_s<seed>[_<sample>].png``."""
    suffix = f"_{sample}" if sample is not None else ""
    return f"{stem}_t{int(start_t)}_s{int(seed)}{suffix}.png"


def collect_inputs(inputs: Iterable[str | os.PathLike], outdir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Expand files, folders and globs (:func:`ldm.imageio.find_images`), leaving out earlier outputs: every file found
    in the output folder when it lies inside an input folder (``--input . --outdir outputs/refine``), and this program's
    outputs (PNG ``Software: latesteps refine``) found in an input folder that is the output folder or lies inside it
    (``--input out --outdir out`` run twice); that folder's other images are read.  A file named explicitly is always
    kept (outputs never overwrite it)."""
    inputs = list(inputs)
    paths, problems = find_images(inputs)
    out_real = os.path.realpath(outdir)
    explicit = {os.path.realpath(p) for p in inputs if os.path.isfile(p)}
    folders = [os.path.realpath(p) for p in inputs if os.path.isdir(p)]
    inner = [f for f in folders if os.path.commonpath([f, out_real]) == out_real]  # the output folder or inside it

    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if real in explicit or os.path.commonpath([real, out_real]) != out_real:
            kept.append(path)
        elif not any(os.path.commonpath([real, f]) == f for f in inner):
            logger.info("%s: inside the output folder; not refined again", format_path(path))
        elif is_refine_output(path):
            logger.info("%s: an earlier output (PNG Software: %s); not refined again", format_path(path), SOFTWARE)
        else:
            kept.append(path)
    if paths and not kept:
        problems.append(
            f"every image found is an earlier output in the output folder {format_path(outdir)} (name a file to refine it "
            "again)"
        )
    return kept, problems


def is_refine_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PNG whose ``Software`` text says :func:`refine_files` wrote it (False for other files,
    and for a file whose text chunks cannot be read: loading it reports that)."""
    try:
        text = read_png_text(path, ["Software"])
    except PromptError:
        return False
    return bool(text) and text.get("Software", "").startswith(SOFTWARE)


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for outputs; inputs sharing a stem get ``-<8 hex of the real path>`` so no output is shared."""
    counts = Counter(p.stem for p in paths)
    return [
        f"{p.stem}-{hashlib.sha256(os.fsencode(os.path.realpath(p))).hexdigest()[:8]}" if counts[p.stem] > 1 else p.stem
        for p in paths
    ]


def build_metadata(
    refiner: Refiner,
    plan: RefinePlan,
    source: str,
    seed: int,
    sample: int,
    n_samples: int,
    parameters: Mapping[str, object] | None = None,
    prompt: Prompt | None = None,
) -> dict[str, str]:
    """PNG text metadata of one output: every parameter, the effective start, the timesteps that ran, routing, each
    checkpoint's sha256; with a ``prompt``, the prompt (:func:`ldm.imageio.prompt.read_image_prompt` reads it back) and
    the experts that ran without it."""
    meta = {
        "Software": SOFTWARE,
        "input": source,
        "start_t": str(plan.start_t),
        "start_step": str(plan.num_timesteps - plan.start_t),
        "effective_start_t": str(plan.effective_start),
        "sampler": plan.sampler,
        "ddim_steps": "" if plan.ddim_steps is None else str(plan.ddim_steps),
        "tail_steps": "" if plan.tail_steps is None else str(plan.tail_steps),
        "eta": f"{plan.eta:g}",
        "seed": str(seed),
        "sample_index": str(sample),
        "n_samples": str(n_samples),
        "tail_timesteps": ",".join(str(t) for t in plan.timesteps),
        "routing": plan.describe_routing(),
        "device": str(refiner.device),
        "precision": refiner.precision,
        "tiling": describe_tiling(refiner.tiling),
        "batch_invariant": str(refiner.batch_invariant),
        "allow_outside_window": str(refiner.router.allow_outside_window),
        "checkpoints": json.dumps([c.as_dict(refiner.num_timesteps) for c in refiner.checkpoints]),
    }
    for i, ckpt in enumerate(refiner.checkpoints):
        meta[f"checkpoint_{i}"] = ckpt.path
        meta[f"checkpoint_{i}_sha256"] = ckpt.sha256
        meta[f"checkpoint_{i}_window"] = f"[{ckpt.window[0]}, {ckpt.window[1]})"
    if prompt is not None:
        meta.update(prompt.as_metadata())
        unguided = unguided_experts(refiner.experts, plan)
        if unguided:
            meta["unguided_experts"] = ", ".join(unguided)
    if parameters is not None:
        meta["parameters"] = json.dumps(dict(parameters), default=str, sort_keys=True)
    return meta


def refine_files(
    refiner: Refiner,
    paths: Sequence[Path],
    outdir: str | os.PathLike,
    request: RefineRequest | None = None,
    *,
    batch_size: int = 1,
    skip_existing: bool = False,
    grid: bool = False,
    parameters: Mapping[str, object] | None = None,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    share: Sequence[int] | None = None,
    prompts: Sequence[Prompt | str | None] | None = None,
) -> BatchReport:
    """Refine every file in ``paths`` (e.g. from :func:`collect_inputs`) into ``outdir`` (created if missing).

    Outputs (:func:`output_name`, ``_<k>`` when ``n_samples > 1``; :func:`output_stems`) are written atomically, so
    ``skip_existing`` after a killed run never takes a partial file for a finished one; the temps a killed run left of
    these outputs are removed first, never a file the batch reads.  An input that cannot be loaded, whose region or
    prompt is bad, whose output would be an input or a folder, or whose batch the networks fail on (e.g. out of memory)
    costs that input only (one line through ``on_error``, default: logged); an output-folder error stops the batch
    (:attr:`BatchReport.fatal`).  The request, ``batch_size`` and the prompts come checked (``scripts/refine.py``).

    Args:
        request: what runs (None: the defaults, whole images); its plan is built before any file is read.
        batch_size: samples refined together (same-size images, one guidance scale).
        grid: also write ``<name>_grid.png``: input | refined, or input | mask overlay | refined with regions.
        parameters: extra key/values recorded in every output's metadata (the CLI passes all its arguments).
        share: refine only the inputs at these indices of ``paths`` (this process's part); output names are still
            decided over all of ``paths``.
        prompts: for text-conditioned experts, one entry per input: a :class:`Prompt`, or a one-line reason why that
            input has none, or None (it fails); None: no input has a prompt.

    Raises:
        ValueError: before any file is written, for steps no expert covers or an output that would overwrite a mask.
    """
    request = request if request is not None else RefineRequest()
    regions, seed, n_samples = request.regions, request.seed, request.n_samples
    plan = refiner.plan_for(request)
    base_start = request.start(refiner.num_timesteps)
    outdir = Path(os.fsdecode(outdir))
    paths = [Path(os.fsdecode(p)) for p in paths]  # str and bytes paths too (the Python API)
    problem = mask_clash(paths, outdir, plan.start_t, seed, n_samples, grid, regions)
    if problem is not None:  # before any file is written or removed: a mask is never overwritten
        raise ValueError(problem)
    needs_prompt = prompts is not None and bool(text_experts(refiner.experts, plan))
    report = BatchReport()
    report_error = on_error if on_error is not None else logger.error
    input_reals = {os.path.realpath(p) for p in paths}
    stems = output_stems(paths)
    mine = list(range(len(paths))) if share is None else list(share)
    show = progress and is_rank_zero()
    bar = tqdm(total=len(mine), desc="images", unit="img", disable=not show)
    remaining: dict[int, int] = {}  # input index -> samples still to write
    finished: set[int] = set()  # inputs done or failed
    pending: list[_Item] = []

    def finish(index: int, reason: str | None = None) -> None:
        if index in finished:
            return
        finished.add(index)
        if reason is None:
            report.done.append(format_path(paths[index]))
        else:
            report.failed.append((format_path(paths[index]), reason))
            report_error(reason)
        bar.update(1)

    def flush() -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        starts = None if batch[0].start_map is None else torch.cat([item.start_map for item in batch])
        prompt = None if batch[0].prompt is None else [item.prompt for item in batch]
        try:
            out = refiner.refine(torch.cat([item.x for item in batch]), request, [item.seed for item in batch],
                                 start_map=starts, prompt=prompt, progress=show)  # fmt: skip
        except Exception as exc:  # whatever the networks raise (a bug, out of memory) costs this batch's inputs only
            size = f"{batch[0].x.shape[3]}x{batch[0].x.shape[2]}"
            kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
            for index in dict.fromkeys(item.source for item in batch):
                finish(index, f"cannot refine {format_path(paths[index])} ({size}): {kind}{one_line_error(exc)}")
            return
        for item, refined in zip(batch, out):
            if item.source in finished:
                continue
            try:
                rgb = tensor_to_image(refined)
            except ValueError as exc:
                finish(item.source, f"cannot refine {format_path(paths[item.source])}: {exc}")
                continue
            meta = build_metadata(refiner, plan, format_path(paths[item.source]), item.seed, item.sample, n_samples, parameters,
                                  item.prompt)  # fmt: skip
            meta.update(item.region_meta)
            report.written.append(save_image_atomic(item.out, rgb, alpha=item.alpha, metadata=meta))
            if grid:
                source = tensor_to_image(item.x)
                middle = [] if item.start_map is None else [mask_overlay(source, item.start_map, plan.start_t)]
                canvas = side_by_side([source, *middle, rgb])
                report.written.append(save_image_atomic(grid_name(item.out), canvas, metadata=meta))
            remaining[item.source] -= 1
            if remaining[item.source] == 0:
                finish(item.source)

    # Temp files of these outputs left by a killed earlier run of the same batch (other files are left alone), but
    # never a file this batch reads: an input or a mask may have a temp's name, and a mask folder is not ours to clean
    mask_folder = regions.mask is not None and regions.mask.is_dir()
    if not (mask_folder and os.path.realpath(regions.mask) == os.path.realpath(outdir)):
        names = [out.name for i in mine for _, _, out in _outputs_for(stems[i], outdir, plan.start_t, seed, n_samples)]
        keep = input_reals | set(_mask_reals(regions))
        remove_stale_temp_files(outdir, names=[*names, *(grid_name(Path(n)).name for n in names)], keep=keep)
    try:
        for index in mine:
            path = paths[index]
            items = _outputs_for(stems[index], outdir, plan.start_t, seed, n_samples)
            written = [p for _, _, out in items for p in ((out, grid_name(out)) if grid else (out,))]
            clash = [out for out in written if os.path.realpath(out) in input_reals]
            if clash:
                shown = format_path(clash[0])
                finish(index, f"{format_path(path)}: output {shown} would overwrite an input; choose another --outdir")
                continue
            too_long = [out for out in written if len(os.fsencode(out.name)) > LONGEST_ATOMIC_NAME]
            if too_long:  # the file system refuses the name (or its temp file's): this input fails, the batch goes on
                size = len(os.fsencode(too_long[0].name))
                finish(index, f"{format_path(path)}: output name {too_long[0].name} is {size} bytes, above the "
                              f"{LONGEST_ATOMIC_NAME} an output may have; rename the input to a shorter name")  # fmt: skip
                continue
            folders = [out for out in written if os.path.isdir(out)]  # in the way of this input's outputs only
            if folders:
                finish(index, f"{format_path(path)}: output {format_path(folders[0])} is a folder; move it away")
                continue
            todo = []
            for sample, sample_seed, out in items:
                # with a grid, an output whose grid is missing (a run killed between the two writes) is written again
                if skip_existing and out.exists() and (not grid or grid_name(out).exists()):
                    report.skipped.append(out)
                else:
                    todo.append((sample, sample_seed, out))
            if not todo:
                finish(index)
                continue
            prompt = prompts[index] if needs_prompt else None
            if needs_prompt and not isinstance(prompt, Prompt):
                missing = f"{format_path(path)}: no prompt for the text-conditioned expert(s); pass one in prompts (CLI: "
                finish(index, prompt if isinstance(prompt, str) else missing + "--prompt, --prompt-file)")
                continue
            try:
                loaded = load_image(path)
            except ImageLoadError as exc:
                finish(index, str(exc))
                continue
            x = image_to_tensor(loaded.rgb)  # [1, 3, H, W] in [-1, 1]; 16-bit sources keep their precision
            try:
                starts, region_meta = _regions_of(refiner, path, loaded.height, loaded.width, base_start, regions)
            except ValueError as exc:  # ImageLoadError included
                finish(index, one_line(exc))
                continue
            remaining[index] = len(todo)
            for sample, sample_seed, out in todo:
                if pending and (
                    len(pending) >= batch_size or pending[0].x.shape != x.shape or _scale(pending[0].prompt) != _scale(prompt)
                ):  # one guidance scale per batch
                    flush()
                pending.append(_Item(index, sample, sample_seed, out, x, loaded.alpha, starts, region_meta, prompt))
        flush()
    except ImageSaveError as exc:
        report.fatal = str(exc)
    finally:
        bar.close()
    return report


def _scale(prompt: Prompt | None) -> float | None:
    return None if prompt is None else prompt.guidance_scale


def _regions_of(
    refiner: Refiner, path: Path, height: int, width: int, start_t: int, regions: RegionOptions
) -> tuple[torch.Tensor | None, dict[str, str]]:
    """The start map ``[1, 1, H, W]`` of one input and its metadata (None, {} without regions)."""
    if not regions.active:
        return None, {}
    mask_path = regions.mask_for(path)
    where = f"{format_path(path)}: " + (f"mask {format_path(mask_path)}: " if mask_path is not None else "")
    try:
        mask, digest = (None, "") if mask_path is None else load_mask(mask_path, (width, height))
        _, starts = refiner.region_start_map(height, width, start_t, None, mask, regions.boxes, regions.dilate)
        crops = region_crops(starts, regions.padding) if regions.crop else None  # at most MAX_REGIONS regions
    except ValueError as exc:  # an unreadable mask, a size that differs from the image's (seen in its header), ...
        raise ValueError(where + str(exc)) from exc
    meta = {**regions.as_metadata(), "mask": "" if mask_path is None else format_path(mask_path), "mask_sha256": digest}
    meta.update(region_metadata(starts, crops))
    return starts, meta


def mask_clash(
    paths: Sequence[Path],
    outdir: str | os.PathLike,
    start_t: int,
    seed: int,
    n_samples: int,
    grid: bool,
    regions: RegionOptions,
) -> str | None:
    """Why this batch would write over a mask it reads (one line naming the output and the mask), or None: every
    output of every input (grids and all processes' shares included) by real path (an input clash is checked per
    input: it costs that input only)."""
    try:
        protected = _mask_reals(regions)
    except OSError as exc:
        return f"--mask {format_path(regions.mask)}: cannot list the mask folder: {exc.strerror or one_line_error(exc)}"
    if not protected:
        return None
    what = f"a mask in the mask folder {format_path(regions.mask)}" if regions.mask.is_dir() else "the mask (--mask)"
    outdir = Path(os.fsdecode(outdir))
    for stem in output_stems(paths):
        for _, _, out in _outputs_for(stem, outdir, start_t, seed, n_samples):
            for written in (out, grid_name(out)) if grid else (out,):
                mask = protected.get(os.path.realpath(written))
                if mask is not None:
                    return (f"output {format_path(written)} would overwrite {format_path(mask)}, {what}: files the "
                            "batch reads are never written; choose another --outdir or move the mask")  # fmt: skip
    return None


def _mask_reals(regions: RegionOptions) -> dict[str, Path]:
    """Every file masks may be read from by its real path; OSError when the mask folder cannot be listed."""
    files = regions.mask_files()
    if not files:
        return {}
    if regions.mask.is_dir():  # files found: there is a mask
        # one realpath per folder and per link, not per file: a mask folder may hold 100,000 files
        real_folder = os.path.realpath(regions.mask)
        reals = {os.path.join(real_folder, p.name): p for p in files}
        reals.update({os.path.realpath(p): p for p in files if p.is_symlink()})
        return reals
    return {os.path.realpath(p): p for p in files}


def grid_name(out: Path) -> Path:
    """``<out's stem>_grid.png``, next to ``out``."""
    return out.with_name(out.stem + "_grid.png")


def _outputs_for(stem: str, outdir: Path, start_t: int, seed: int, n_samples: int) -> list[tuple[int, int, Path]]:
    # (sample index, seed, output path) for every sample of one input
    return [(k, seed + k, outdir / output_name(stem, start_t, seed, k if n_samples > 1 else None)) for k in range(n_samples)]
