"""README as tests, part two: README.md's commands run (tests/test_readme.py parses and checks them; which run, and why
the others do not, is tests/readme_support.py's ``why_not_run``).

Each command runs as README writes it, with its script's suffix of ``RUN_SUFFIX`` appended (a few training steps,
2 evaluation images, a free port), in a sandbox: a temporary folder with the clone's ``scripts/``, ``configs/``,
``weights/``, ``benchmarks/`` and ``main.py`` linked in, where the user's files README names stand in as
``STAND_INS`` says (tiny photo crops and experts; ``logs/<name>/`` is the run an earlier README command made, or tiny
experts), and the quick start's checkpoints are tiny ones of its own configs.  Every non-loopback connection is
refused (the sitecustomize of tests/app_support.py): README's commands download nothing.

Each command is its own process, forked from a warm interpreter (tests/warm_python.py; ``LATESTEPS_TEST_FRESH=1``
starts each fresh).  The web app's commands serve, answer ``/api/info`` and stop on Ctrl+C with exit 0.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app_support import SITECUSTOMIZE
from conftest import build_tiny_expert, load_photos, save_expert_checkpoint, write_image_folder
from readme_support import (
    COMMANDS,
    INLINE_COMMANDS,
    OUTPUT_FLAGS,
    REPO,
    RUN_FOLDER,
    RUN_SUFFIX,
    STAND_INS,
    Command,
    command_id,
    invocation,
    why_not_run,
)
from warm_python import run_python

RUN = [c for c in COMMANDS + INLINE_COMMANDS if not why_not_run(c)]
SERVED = [c for c in RUN if invocation(c).script == "scripts/app.py"]  # long-running: asked, then stopped
FINISHED = [c for c in RUN if c not in SERVED]
LINKED = ("scripts", "configs", "weights", "benchmarks", "main.py")  # the clone's files a command may name
TIMEOUT_S = 300.0
# logs/<name>/ that README names and no README command makes (the user's own runs): which tiny expert stands in
RUN_STAND_INS = {"500-750-run": "shapes", "750-1000-run": "details", "run": "details"}

# ---------------------------------------------------------------------------------------------------------------------
# the sandbox


def _quickstart_checkpoints(folder: Path) -> None:
    """Tiny checkpoints of the quick start's own configs (random weights, its architecture) where it writes them."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config

    folder.mkdir(parents=True)
    configs = {name: OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "quickstart" / f"{name}.yaml"))
               for name in ("latesteps_500_750", "latesteps_750_1000")}  # fmt: skip
    first_stage = configs["latesteps_500_750"]["model"]["params"]["first_stage_config"]
    first_stage["params"]["ckpt_path"] = None
    torch.manual_seed(0)
    vq = instantiate_from_config(first_stage)
    save_checkpoint({"state_dict": vq.state_dict()}, folder / "vq_f4.ckpt")
    for seed, (name, config) in enumerate(configs.items(), 1):
        params = config["model"]["params"]
        params["first_stage_config"]["params"]["ckpt_path"] = None
        params.pop("ckpt_path", None)
        torch.manual_seed(seed)
        model = instantiate_from_config(config["model"])
        model.first_stage_model.load_state_dict(vq.state_dict())
        save_checkpoint({"state_dict": model.state_dict(), "config": {"model": config["model"]},
                         "window": [params["t_min"], params["t_max"]], "global_step": 0}, folder / f"{name}.ckpt")  # fmt: skip
    (folder / "quickstart.json").write_text(json.dumps({"domain": "photos", "smoke": True}))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder laid out as a clone in which README's commands find the files they name (see the module docstring)."""
    from ldm.convert.diffusers import checkpoint_to_diffusers

    root = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    shapes = build_tiny_expert(250, 500, seed=0)
    details = build_tiny_expert(0, 250, seed=1, first_stage_state=shapes.first_stage_model.state_dict())
    full = build_tiny_expert(0, 1000, seed=2, first_stage_state=shapes.first_stage_model.state_dict())
    experts = {"A.ckpt": shapes, "shapes.ckpt": shapes, "B.ckpt": details, "details.ckpt": details,
               "full_range.ckpt": full, "outputs/demo_curve/checkpoints/a64.ckpt": shapes,
               "outputs/demo_curve/checkpoints/b64.ckpt": details,
               "outputs/quickstart_synthetic/checkpoints/latesteps_500_750.ckpt": shapes,
               "outputs/quickstart_synthetic/checkpoints/latesteps_750_1000.ckpt": details,
               **{f"logs/{name}/checkpoints/last.ckpt": {"shapes": shapes, "details": details}[role]
                  for name, role in RUN_STAND_INS.items()}}  # fmt: skip
    for path, model in experts.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        save_expert_checkpoint(model, root / path)
    checkpoint_to_diffusers(root / "full_range.ckpt", root / "path" / "to" / "ldm-celebahq-256")
    _quickstart_checkpoints(root / "outputs" / "quickstart" / "checkpoints")

    astro, coffee, chelsea = load_photos()
    _save_png(coffee[::8, ::8][:32, :48], root / "img.png")
    _save_png(astro[::8, ::8][:48, :64], root / "face.png")
    _save_png(chelsea[:160, :352], root / "photo.png")
    mask = np.zeros((160, 352), np.uint8)
    mask[40:90, 100:180] = 255
    _save_png(mask, root / "photo_mask.png")
    _save_png(coffee[::4, ::4][:96, :128], root / "big.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[10:30, 10:40] = mask[60:80, 80:120] = 255
    _save_png(mask, root / "masks" / "big.png")
    for folder in ("my_artifacts", "clean"):
        for i in range(2):
            _save_png(astro[::8, ::8][16 * i : 16 * i + 32, :32], root / folder / f"im{i}.png")
    write_image_folder(root / "data" / "train", 4)
    missing = [name for name in STAND_INS if not (root / name).exists()]
    assert not missing, f"STAND_INS names files the sandbox does not make: {missing}"
    (root / ".site").mkdir()
    (root / ".site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return root


def environment(root: Path) -> dict[str, str]:
    """The commands' environment: one thread, the network guard, no run folder handed down, no display."""
    env = {k: v for k, v in os.environ.items() if k not in ("LATESTEPS_LOGDIR", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", NO_PROXY="*",
               PYTHONPATH=os.pathsep.join([str(root / ".site"), str(REPO)]),
               NO_NET_LOG=str(root / ".site" / "net.log"))  # fmt: skip
    return env


def resolved(command: Command, root: Path) -> list[str]:
    """README's words for ``command`` (after the interpreter or launcher) with each ``logs/<name>/`` placeholder made
    real: the run folder an earlier README command made (``main.py -n name``: ``logs/<stamp>_name``), else the sandbox's
    ``logs/<name>/`` (:data:`RUN_STAND_INS`); then its script's suffix."""
    inv = invocation(command)

    def real(match: re.Match) -> str:
        name = match.group(1)
        runs = sorted((root / "logs").glob(f"*_{name.removesuffix('-run')}"))
        if runs:
            return f"logs/{runs[-1].name}"
        assert name in RUN_STAND_INS, (
            f"README.md:{command.line}: logs/<{name}> is neither a run an earlier README "
            "command made in this session (run the whole file) nor one of RUN_STAND_INS"
        )
        return f"logs/{name}"

    words = [re.sub(r"logs/<([^<>/]+)>", real, word) for word in (inv.script, *inv.args)]
    assert not any("<" in w and ">" in w for w in words), f"README.md:{command.line}: a placeholder left in {words}"
    suffix = list(RUN_SUFFIX[inv.script])
    if inv.script == "scripts/evaluate.py" and {"--images", "--no-reference"} & set(words):
        del suffix[suffix.index("--n-images") : suffix.index("--n-images") + 2]  # held-out crops only: refused there
    return [*words, *suffix]


@pytest.fixture(scope="module")
def run(sandbox):
    """``run(argv)``: ``python *argv`` in the sandbox, README's environment, a forked process of its own; asserts it
    ends within :data:`TIMEOUT_S`."""

    def running(argv: list[str]) -> subprocess.CompletedProcess:
        try:
            return run_python(argv, cwd=sandbox, env=environment(sandbox), timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{argv} still running after {TIMEOUT_S} s: {exc.stdout[-2000:]}") from None

    return running


def tail(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def files_under(root: Path) -> dict[Path, int]:
    """``{path: mtime_ns}`` of the files under ``root`` a command may write (the linked clone left out)."""
    found = {}
    for folder, dirs, names in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in LINKED and not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            found[path] = path.stat().st_mtime_ns
    return found


# ---------------------------------------------------------------------------------------------------------------------
# the commands


@pytest.mark.parametrize("command", FINISHED, ids=command_id)
def test_readme_command_runs(command, sandbox, run):
    """Exit 0, something written (where ``--out``/``--outdir``/``--output`` says, when given), nothing sent off the
    machine; ``--help`` prints its usage."""
    argv = resolved(command, sandbox)
    before = files_under(sandbox)
    done = run(argv)
    assert done.returncode == 0, f"README.md:{command.line}: {command}\nran as: {argv}\n{tail(done)}"
    if "--help" in argv:
        assert done.stdout.startswith("usage: "), tail(done)
    else:
        written = {p for p, mtime in files_under(sandbox).items() if before.get(p) != mtime}
        assert written, f"README.md:{command.line}: {command} wrote nothing\n{tail(done)}"
        for flag, value in zip(argv, argv[1:]):
            if flag in OUTPUT_FLAGS:
                assert any(p == sandbox / value or sandbox / value in p.parents for p in written), (
                    f"README.md:{command.line}: nothing written to {flag} {value}: {sorted(map(str, written))[:10]}"
                )
    assert (sandbox / ".site" / "net.log").read_text().splitlines() == ["loaded"], "a README command reached outside localhost"


@pytest.mark.parametrize("command", SERVED, ids=command_id)
def test_app_commands_serve_and_stop_on_ctrl_c(command, sandbox):
    """README's app lines (the shipped demo experts, the quick start's experts) serve: GET /api/info lists both
    experts; Ctrl+C stops the server with exit 0."""
    argv = [sys.executable, *resolved(command, sandbox)]
    err = sandbox / f".app{command.line}.err"
    with err.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=sandbox, env=environment(sandbox), stdout=subprocess.PIPE, stderr=stderr,
                                bufsize=0)  # fmt: skip
    out = b""
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:  # the URL line, without blocking past the deadline
            if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            url = re.search(rb"serving on (http://127\.0\.0\.1:\d+/)", out)
        assert url, f"README.md:{command.line}: {command} did not serve: {out.decode()}{err.read_text()}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url.group(1).decode() + "api/info", timeout=30) as response:
            info = json.load(response)
        assert len(info["experts"]) == 2, info
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
    assert code == 0, f"README.md:{command.line}: Ctrl+C gave exit status {code}: {err.read_text()}"


def test_the_run_folder_placeholder_is_what_main_py_names():
    """``logs/<name>`` in README resolves to ``logs/<stamp>_<name>`` (main.py ``-n name``), with ``-run`` dropped."""
    assert RUN_FOLDER.match("logs/<pixel_500_750-run>/checkpoints/last.ckpt").group(1) == "pixel_500_750-run"
    names = {c.argv[c.argv.index("-n") + 1] for c in FINISHED if "-n" in c.argv}
    used = {m.group(1).removesuffix("-run") for c in FINISHED for w in c.argv for m in re.finditer(r"logs/<([^<>/]+)>", w)}
    assert {u for u in used if u.startswith("pixel_")} <= names, (used, names)
