"""Shared plumbing of the benchmarks: threads, machine description, peak memory, child processes, tables, JSON.

Benchmarks are scripts (``python benchmarks/<name>.py``), never tests: they print a table and write
``benchmarks/results/<name>-<timestamp>.json`` (git-ignored) with the machine, the thread count and the load average
at measurement time, so every figure can be traced to where and how it was measured.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Where results go; LATESTEPS_BENCH_RESULTS moves them (tests/test_benchmarks.py writes into a temporary folder).
RESULTS = Path(os.environ.get("LATESTEPS_BENCH_RESULTS") or REPO / "benchmarks" / "results")
REAL_CONFIG = REPO / "configs" / "latesteps_500_750.yaml"
TINY_CONFIG = REPO / "configs" / "quickstart" / "latesteps_500_750.yaml"
MODEL_CONFIGS = {"real": REAL_CONFIG, "tiny": TINY_CONFIG}
CHILD_FLAG = "--child-config"
THREADS_HELP = (
    "torch intra-op / OpenMP threads, set explicitly and reported (default 1: on a shared machine, OpenMP threads that "
    "spin-wait for a busy core made 2-thread timings 10-100x slower and erratic; use all cores on a quiet machine)"
)


def set_threads(threads: int) -> None:
    """Pin intra-op threads (and OpenMP/MKL for child processes) to ``threads``; call before heavy work."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and how a figure was measured: CPU, cores, memory, load, torch, threads, GPU, git commit."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
        "commit": _git_commit(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync(device: Any) -> None:
    """Wait for queued work on ``device`` (CUDA) so that wall-clock timings are complete."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn()``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------------------------------------ models
def _load_model_config(size: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if size not in MODEL_CONFIGS:
        raise ValueError(f"model size {size!r} is not one of {sorted(MODEL_CONFIGS)}")
    return copy.deepcopy(OmegaConf.to_container(OmegaConf.load(MODEL_CONFIGS[size]), resolve=True)["model"])


def model_config(
    size: str, t_min: int | None = None, t_max: int | None = None, first_stage: str | None = None
) -> dict[str, Any]:
    """The late-steps model config of ``configs/`` for ``size`` ("tiny": quickstart, "real": latesteps_500_750), with
    checkpoint paths removed (random weights: benchmarks need sizes, not trained weights).  ``first_stage`` takes the
    first stage of another size (e.g. the tiny UNet with the real VQ-f4)."""
    model = _load_model_config(size)
    params = model["params"]
    if first_stage is not None and first_stage != size:
        params["first_stage_config"] = _load_model_config(first_stage)["params"]["first_stage_config"]
    params.pop("ckpt_path", None)
    params["first_stage_config"]["params"].pop("ckpt_path", None)
    if t_min is not None:
        params["t_min"], params["t_max"] = t_min, t_max
    return model


def build_model(
    size: str, t_min: int = 250, t_max: int = 500, seed: int = 0, ema: bool = False, first_stage: str | None = None
) -> Any:
    """A randomly initialised late-steps model of ``size`` on ``[t_min, t_max)``, in eval mode.

    The zero-initialised output layers (UNet output conv, attention projections) get small random weights so the
    network's output is not identically zero (which would make precision comparisons meaningless).
    """
    import torch

    from ldm.util import instantiate_from_config

    cfg = model_config(size, t_min, t_max, first_stage)
    cfg["params"]["use_ema"] = ema
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if name.endswith("weight") and param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def build_experts(size: str, seed: int = 0, first_stage: str | None = None) -> list[Any]:
    """Two window experts of ``size`` sharing one first stage: ``[250, 500)`` and ``[0, 250)`` (the late steps)."""
    shapes = build_model(size, 250, 500, seed=seed, first_stage=first_stage)
    details = build_model(size, 0, 250, seed=seed + 10, first_stage=first_stage)
    details.first_stage_model = shapes.first_stage_model
    return [shapes, details]


def photo_batch(n: int, size: int, seed: int = 0) -> Any:
    """``n`` photographs (scikit-image's bundled ones, resized to ``size`` x ``size``) as ``[n, 3, size, size]`` in [-1, 1].

    Without scikit-image (e.g. a GPU machine with only torch) smooth random images stand in: timings do not depend on
    the pixels.
    """
    import importlib.util

    import torch
    import torch.nn.functional as F

    if importlib.util.find_spec("skimage") is None:
        print("note: scikit-image is not installed; benchmarking on smooth random images", flush=True)
        coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    from ldm.data.embedded import DEFAULT_PHOTOS, load_photo

    images = []
    for i in range(n):
        photo = torch.from_numpy(load_photo(DEFAULT_PHOTOS[(seed + i) % len(DEFAULT_PHOTOS)]).copy())
        x = photo.permute(2, 0, 1)[None].float() / 127.5 - 1.0
        images.append(F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    return torch.cat(images).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------- child processes
def run_child(script: Path, config: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh Python process with ``--child-config <json>``; return the JSON it prints last.

    A fresh process per configuration gives an honest peak RSS.  A child killed by the OOM killer or a timeout is
    reported as ``{"error": ...}`` (also with the parent's ``RUSAGE_CHILDREN`` peak, which covers the dead child).
    """
    cmd = [sys.executable, str(script), CHILD_FLAG, json.dumps(dict(config))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {"error": f"{reason}: {tail}", "children_peak_rss_mib": round(children_peak), "wall_s": round(elapsed, 1)}
    return json.loads(lines[-1])


def child_config(argv: Sequence[str]) -> dict[str, Any] | None:
    """The configuration passed to a child process (None in the parent)."""
    if len(argv) >= 3 and argv[1] == CHILD_FLAG:
        return json.loads(argv[2])
    return None


def emit_child_result(result: Mapping[str, Any]) -> None:
    """Print a child's result as the single JSON line :func:`run_child` reads."""
    print(json.dumps(dict(result)), flush=True)


# ------------------------------------------------------------------------------------------------- tables and files
def train_saving(
    name: str,
    config: Path,
    steps: int,
    overrides: Sequence[str],
    *,
    outdir: Path,
    save_every: int,
    seed: int,
    threads: int,
    smoke: bool = False,
) -> list[tuple[int, Path]]:
    """Train ``config`` with ``main.py`` for ``steps`` optimizer steps, keeping a checkpoint every ``save_every`` steps
    (validated at the same cadence), unless ``<outdir>/checkpoints/<name>.ckpt`` exists from an earlier call; returns
    ``[(step, checkpoint), ...]`` in step order, the final step (``last.ckpt``, copied to that path) included.

    Raises :class:`ldm.train.stages.StageError` when the run fails.
    """
    from ldm.train.stages import SMOKE_OVERRIDES, Stage, run_stage

    target = outdir / "checkpoints" / f"{name}.ckpt"
    record = outdir / "logs" / f"{name}.run"
    if not target.is_file() or not record.is_file():
        options = [
            *overrides,
            f"lightning.trainer.max_steps={steps}",
            f"lightning.modelcheckpoint.params.every_n_train_steps={save_every}",
            "lightning.modelcheckpoint.params.save_top_k=-1",
            f"lightning.trainer.val_check_interval={save_every}",
            f"lightning.callbacks.image_logger.params.batch_frequency={steps}",
            *(SMOKE_OVERRIDES if smoke else ()),
        ]
        folder = run_stage(
            Stage(name, name, config, options, str(threads)),
            outdir / "logs",
            target,
            seed,
            echo=lambda line: print(line, flush=True),
        )
        record.write_text(str(folder))
    run_dir = Path(record.read_text())
    saved = {steps: target}  # the final step (last.ckpt, off the save cadence when it does not divide steps)
    for path in (run_dir / "checkpoints").glob("*step=*.ckpt"):
        saved.setdefault(int(path.stem.rsplit("step=", 1)[1]), path)
    return sorted(saved.items())


def print_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """A plain aligned text table of ``columns`` (missing values shown as ``-``)."""
    rows = list(rows)
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``<RESULTS>/<name>-<timestamp>.json`` (default ``benchmarks/results/``); returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(dict(payload), indent=2, default=str) + "\n")
    print(f"\nresults: {shown(path)}")
    return path


def shown(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside it (shorter to read), else as given."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def report(name: str, rows: list[dict[str, Any]], columns: Sequence[str], title: str, args: Any) -> int:
    """Print ``rows`` as a table and write them with the machine and the arguments to ``results/<name>-<time>.json``;
    returns 0 (a benchmark's exit status)."""
    print_table(rows, columns, title=title)
    write_results(name, {"machine": machine_info(args.device), "args": vars(args), "rows": rows})
    return 0


def run_script(measure: Callable[[dict[str, Any]], Mapping[str, Any]], main: Callable[[], int]) -> None:
    """A benchmark's entry point: in a child process (``--child-config``) measure one configuration and print it,
    otherwise run ``main()`` and exit with its status."""
    child = child_config(sys.argv)
    if child is not None:
        emit_child_result(measure(child))
    else:
        sys.exit(main())
