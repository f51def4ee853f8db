"""README.md's commands as data, for tests/test_readme.py (parsed and checked) and tests/test_readme_run.py (run):
the ```bash blocks and the commands quoted in the prose, what each runs, the paths it names, and why a command is not
run by the tests (:func:`why_not_run`).

- The blocks are parsed into commands (``\\`` continuations joined, trailing ``# comments`` stripped, ``&&`` chains
  split, ``#SBATCH`` directives and ``export`` lines skipped), each with its README line for the messages.
- A command runs an entry point of this repository (``scripts/*.py``, ``benchmarks/*.py``, ``main.py``, directly,
  through ``.venv/bin/python`` or under ``torchrun``/``srun``) or a known tool (pip, ruff, pytest, bash).
- Paths a clone cannot hold are :data:`PLACEHOLDERS` (the user's files, CompVis downloads), each with why.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import inspect
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# ---------------------------------------------------------------------------------------------------------------------
# README's ```bash blocks -> commands


@dataclass(frozen=True)
class Command:
    """One shell command of a README block."""

    line: int  # the README line it starts on
    argv: tuple[str, ...]  # its words as the shell passes them (quotes removed, nothing expanded)
    block: int  # the line of its block's opening fence
    sbatch: bool = False  # its block is a SLURM batch script (it holds #SBATCH directives)

    def __str__(self) -> str:
        return shlex.join(self.argv)


# shell operators the parser does not model: a README command using one needs this parser extended first
UNSUPPORTED_OPERATORS = frozenset({"|", "||", ";", "&", ">", ">>", "<", "2>", "2>&1", "&>"})
SKIPPED_LINE = re.compile(r"^\s*export\s")  # environment for the commands below (the SLURM script's run folder)
NBSP = "\u00a0"  # not whitespace to shlex: keeps a placeholder's words together
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")  # OMP_NUM_THREADS=1 python ...


def strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a ``#`` that starts a word outside quotes, as bash reads it)."""
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                i += 1
        elif ch == "\\":
            i += 1
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def shell_words(text: str) -> list[str]:
    """``text`` split into words as the shell does, except that a ``<...>`` placeholder is one word with its spaces
    (``logs/<500-750 run>/checkpoints/last.ckpt``: the user replaces it; to bash its ``<`` and ``>`` would redirect)."""
    protected = re.sub(r"<[^<>\n]*>", lambda m: m.group(0).replace(" ", NBSP), text)
    return [word.replace(NBSP, " ") for word in shlex.split(protected)]


def bash_blocks(text: str, language: str = "bash") -> list[tuple[int, list[tuple[int, str]]]]:
    """``(fence line, [(line number, line), ...])`` of every ```bash (or ``language``) block of the markdown ``text``."""
    blocks: list[tuple[int, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] | None = None
    start = 0
    other_fence = False  # inside a non-bash fenced block (yaml, python): a ```bash there would be its content
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        closing = re.fullmatch(r"`{3,}", stripped) is not None  # a closing fence has no info string
        if current is not None:
            if closing:
                blocks.append((start, current))
                current = None
            else:
                current.append((number, line))
        elif other_fence:
            other_fence = not closing
        elif stripped == f"```{language}":
            current, start = [], number
        elif stripped.startswith("```"):
            other_fence = True
    if current is not None:
        raise ValueError(f"README.md:{start}: a ```{language} block is never closed")
    return blocks


def block_commands(start: int, lines: list[tuple[int, str]]) -> list[Command]:
    """The commands of one block (see the module docstring for what is joined, stripped, split and skipped)."""
    sbatch = any(line.lstrip().startswith("#SBATCH") for _, line in lines)
    commands: list[Command] = []
    text, first = "", None
    for number, raw in lines:
        code = strip_comment(raw)
        if first is None:
            if not code.strip() or SKIPPED_LINE.match(code):  # blank, a comment (#SBATCH is one to bash), export
                continue
            first = number
        continued = code.endswith("\\")
        text += " " + (code[:-1] if continued else code)
        if continued:
            continue
        words = shell_words(text)
        bad = sorted(set(words) & UNSUPPORTED_OPERATORS)
        if bad:
            raise ValueError(
                f"README.md:{first}: shell operator(s) {bad} are not understood by tests/test_readme.py's "
                "parser; extend it (or write the command without them)"
            )
        chain: list[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                chain.append(word)
                continue
            if not chain:
                raise ValueError(f"README.md:{first}: an empty command in an '&&' chain")
            commands.append(Command(first, tuple(chain), start, sbatch))
            chain = []
        text, first = "", None
    if first is not None:
        raise ValueError(f"README.md:{first}: a '\\' continuation runs past the end of its block")
    return commands


def readme_commands(text: str) -> list[Command]:
    return [command for start, lines in bash_blocks(text) for command in block_commands(start, lines)]


@functools.cache
def readme_text() -> str:
    return README.read_text(encoding="utf-8")


COMMANDS = readme_commands(readme_text())

INLINE_PROGRAM = re.compile(r"^(python3?|\.venv/bin/python|torchrun|srun|bash) \S")
INLINE_SPAN = re.compile(r"`([^`]+)`")


def inline_commands(text: str) -> list[Command]:
    """Commands README's prose quotes in `code spans` (``python scripts/refine.py --help``, the benchmarks' command
    lines), outside fenced blocks; a span may wrap onto the next line of its paragraph.  ``block`` is 0."""
    lines = text.splitlines()
    fence = False
    for i, line in enumerate(lines):  # blank the fenced blocks, keeping the line numbers
        toggles = line.strip().startswith("```")
        if fence or toggles:
            lines[i] = ""
        fence ^= toggles
    commands, paragraph, first = [], [], 0
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            paragraph, first = [*paragraph, line], first or number
            continue
        joined = "\n".join(paragraph)
        for match in INLINE_SPAN.finditer(joined):
            code = " ".join(match.group(1).split())
            if INLINE_PROGRAM.match(code) and re.search(r"\.(py|sh)\b", code):
                line_number = first + joined.count("\n", 0, match.start())
                commands.append(Command(line_number, tuple(shell_words(code.replace("…", "..."))), 0))
        paragraph, first = [], 0
    return commands


INLINE_COMMANDS = inline_commands(readme_text())

# ---------------------------------------------------------------------------------------------------------------------
# what a command runs

PYTHONS = frozenset({"python", "python3", ".venv/bin/python"})
LAUNCHERS = frozenset({"torchrun", "srun"})  # torchrun runs a script itself; srun runs any command
PIPS = frozenset({"pip", ".venv/bin/pip"})
RUFFS = frozenset({"ruff", ".venv/bin/ruff"})
SHELLS = frozenset({"bash"})  # bash benchmarks/gpu.sh: checked to exist
PYTHON_MODULES = frozenset({"venv", "pytest"})  # python -m X: not this repository's code, only checked to exist
ENTRY_POINT = re.compile(r"^(main\.py|(scripts|benchmarks)/\w+\.py)$")


@dataclass(frozen=True)
class Invocation:
    launcher: str | None  # torchrun / srun
    program: str  # the interpreter or tool
    script: str | None  # a .py file python runs
    module: str | None  # python -m <module>
    args: tuple[str, ...]  # what follows the script, module or tool


def invocation(command: Command) -> Invocation:
    words = list(command.argv)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    launcher = None
    if words and words[0] in LAUNCHERS:
        launcher = words.pop(0)
        # the launcher's own options run up to the program: an interpreter, or a script torchrun runs itself
        starts = [i for i, word in enumerate(words) if word in PYTHONS or word.endswith(".py")]
        if not starts:
            raise ValueError(f"README.md:{command.line}: no python program after {launcher}: {command}")
        words = words[starts[0] :]
    if not words:
        raise ValueError(f"README.md:{command.line}: no program in {command}")
    program, rest = words[0], words[1:]
    if program.endswith(".py"):  # torchrun --nproc-per-node 8 scripts/x.py ...
        return Invocation(launcher, "python", program, None, tuple(rest))
    if program in PYTHONS and rest[:1] == ["-m"] and len(rest) > 1:
        return Invocation(launcher, program, None, rest[1], tuple(rest[2:]))
    if program in PYTHONS and rest:
        return Invocation(launcher, program, rest[0], None, tuple(rest[1:]))
    return Invocation(launcher, program, None, None, tuple(rest))


def command_id(command: Command) -> str:
    where = "L" if command.block else "inline-L"
    return f"{where}{command.line}:{Path(invocation(command).script or invocation(command).program).name}"


ENTRY_COMMANDS = [c for c in COMMANDS if invocation(c).script is not None]
INLINE_ENTRY_COMMANDS = [c for c in INLINE_COMMANDS if invocation(c).script is not None]

# ---------------------------------------------------------------------------------------------------------------------
# parsing a command's arguments with its script's own parser, without running it


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a script's ``main`` has parsed: the work after it never runs."""


@functools.cache
def load_script(relative: str):
    """The script at ``relative`` imported as a module (its ``__main__`` block does not run)."""
    name = "readme_" + re.sub(r"\W", "_", relative[:-3])
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)  # benchmarks put their folder first on sys.path to import their common.py
    sys.path.insert(0, str((REPO / relative).parent))  # as `python <script>` does: its folder comes first
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path[:] = saved
    return module


@contextlib.contextmanager
def stop_after_parse_args() -> Iterator[None]:
    """``ArgumentParser.parse_args`` parses as always, then raises :class:`_Parsed` (for scripts that build their
    parser inside ``main``: the benchmarks)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_with_script(script: str, args: list[str]) -> None:
    """Parse ``args`` as ``script`` does; raise SystemExit (argparse), or AssertionError with the script's message."""
    if script == "main.py":  # main.py parses with ldm.train.cli.parse_cli (flags, then key=value / ~key overrides)
        from ldm.train.cli import CLIError, parse_cli

        try:
            parse_cli(args)
        except CLIError as exc:
            raise AssertionError(str(exc)) from None
        return
    module = load_script(script)
    if script == "scripts/cache_latents.py":  # flags and the dotlist overrides main.py takes, anywhere on the line
        parsed, problem = module.parse_args(args)
        assert problem is None, problem
    elif script == "scripts/quickstart.py":  # its own checks run before any training, and are cheap
        parsed = module.apply_domain_defaults(module.build_parser().parse_args(args))
        problem = module.check_arguments(parsed)
        assert problem is None, problem
    elif hasattr(module, "build_parser"):
        module.build_parser().parse_args(args)
    else:
        takes_argv = bool(inspect.signature(module.main).parameters)
        saved = sys.argv
        sys.argv = [script, *args]  # a main() without parameters parses sys.argv, as `python <script> args` sets it
        try:
            with stop_after_parse_args():
                module.main(args) if takes_argv else module.main()
        except _Parsed:
            return
        finally:
            sys.argv = saved
        raise AssertionError(f"{script}'s main() returned without calling parse_args")


def parse_problem(script: str, args: list[str]) -> str | None:
    """None when ``args`` parse as ``script``'s command line, else what its parser said."""
    err = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # as README runs them: from the clone's root
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_with_script(script, args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip() or f"exit status {exc.code}"
    except AssertionError as exc:
        return str(exc)
    finally:
        os.chdir(cwd)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the paths a command names

# Paths README commands name that a clone cannot hold, each with why.  A path matching none of these (and not a quick
# start output or something the command writes itself) must exist in the repository.
PLACEHOLDERS: tuple[tuple[str, str], ...] = (
    (r"<[^>]*>", "a run folder of the user's own training (logs/<timestamp>_<name>/ is made by main.py)"),
    (r"^models/", "CompVis downloads (vq-f4, LDMs) or the user's converted checkpoints: git-ignored, never shipped"),
    (r"^path/to/", "the user's own diffusers folder (nothing is downloaded)"),
    (r"^data/", "the user's training images"),
    (r"^shards/", "the user's tar shards of images"),
    (r"^(img|in|photo|photo_mask|big|face)\.png$", "the user's image to refine, or its mask"),
    (r"^stable-diffusion-v1-5/?$", "the user's Stable Diffusion v1 folder in the diffusers layout (a download, never shipped)"),
    (r"^before\.json$", "what benchmarks/refine_bytes.py recorded before a change (its --check compares with it)"),
    (r"^(masks|my_artifacts|generated|clean)/$", "a folder of the user's images (generated, clean, with artifacts) or masks"),
    (r"^([A-Z]|shapes|details|full_range)\.ckpt$", "the user's own experts, named by role"),
    (r"^my_cached_data\.yaml$", "the YAML overlay README shows after the block, written by the user"),
    (r"^outputs/demo_curve/", "what benchmarks/photo_curve.py writes in the command before it (about 50 min of training)"),
)
OUTPUT_FLAGS = frozenset({"--outdir", "--out", "--output"})  # what the command itself writes
PATH_LIKE = re.compile(r"/|\.(ya?ml|py|ckpt|safetensors|pt|pth|png|jpe?g|txt|json|tar|sh)$")
DOTLIST = re.compile(r"^~?[A-Za-z_][\w-]*(\.[\w-]+)+=")  # model.params.ckpt_path=...
QUICKSTART_PATH = re.compile(r"\boutputs/(quickstart\w*)/([\w./-]*)")


def named_paths(inv: Invocation) -> list[str]:
    """The paths ``inv`` reads or names (its script, option values, dotlist values), not those it writes itself."""
    words = [inv.script] if inv.script else []
    after_output_flag = False
    for word in inv.args:
        if after_output_flag:
            after_output_flag = False
            continue
        if word.startswith("-"):
            flag, has_value, value = word.partition("=")
            after_output_flag = flag in OUTPUT_FLAGS and not has_value
            if has_value and flag not in OUTPUT_FLAGS:
                words.append(value)
        elif DOTLIST.match(word):
            words.append(word.split("=", 1)[1])
        else:
            words.append(word)
    return [word for word in words if PATH_LIKE.search(word) and "://" not in word]


def placeholder(path: str) -> str | None:
    """Why ``path`` is not in a clone (see :data:`PLACEHOLDERS`), or None."""
    return next((why for pattern, why in PLACEHOLDERS if re.search(pattern, path)), None)


@functools.cache
def quickstart_files() -> dict[str, frozenset[str]]:
    """``{default --outdir: files the quick start writes there}`` for every valid ``--domain`` x ``--weights``, from
    scripts/quickstart.py's own defaults and its OUTPUTS."""
    qs = load_script("scripts/quickstart.py")
    files: dict[str, frozenset[str]] = {}
    for domain in qs.DOMAIN_NAMES:
        for weights in qs.WEIGHTS:
            args = qs.apply_domain_defaults(qs.build_parser().parse_args(["--domain", domain, "--weights", weights]))
            if qs.check_arguments(args) is not None:  # --weights demo takes only --domain photos
                continue
            outputs = set(qs.OUTPUTS)
            if weights == "demo":  # trains nothing: no stage checkpoints
                outputs -= {f"checkpoints/{name}.ckpt" for name in qs.STAGE_NAMES}
            files[args.outdir] = frozenset(outputs)
    return files


def quickstart_path_problem(path: str) -> str | None:
    """None when ``path`` (``outputs/quickstart.../...``) is a folder or file the quick start writes, else why not."""
    match = QUICKSTART_PATH.search(path)
    outdir, rest = f"outputs/{match.group(1)}", match.group(2).rstrip("/")
    written = quickstart_files().get(outdir)
    if written is None:
        return f"{outdir} is no default --outdir of scripts/quickstart.py (those are {sorted(quickstart_files())})"
    folders = {name.rsplit("/", 1)[0] for name in written if "/" in name}
    if rest and rest not in written and rest not in folders:
        return f"scripts/quickstart.py writes no {rest!r} into {outdir} (it writes {sorted(written)})"
    return None


def path_problem(path: str) -> str | None:
    if placeholder(path):
        return None
    if QUICKSTART_PATH.search(path):
        return quickstart_path_problem(path)
    if not (REPO / path).exists():
        return f"{path} is not in the repository (and is no placeholder of tests/test_readme.py's PLACEHOLDERS)"
    return None


CACHED_DATA_YAML = "my_cached_data.yaml"


def cached_data_yaml() -> str:
    """README's ```yaml block that swaps the training dataset for cached latents (what my_cached_data.yaml holds)."""
    blocks = [
        block
        for _, block in bash_blocks(readme_text(), "yaml")
        if any("ldm.data.cached_latents.CachedLatents" in line for _, line in block)
    ]
    assert blocks, "README has no ```yaml block with ldm.data.cached_latents.CachedLatents (my_cached_data.yaml)"
    return "\n".join(line for _, line in blocks[0]) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# which commands tests/test_readme_run.py runs (and with what appended), and why the others are not run; those are
# still parse-checked by tests/test_readme.py

CLUSTER = "a cluster launcher (torchrun/srun) or a SLURM batch script: needs several GPUs or SLURM"
GPU = "needs a GPU (--device cuda, or a GPU benchmark script)"
SD_WEIGHTS = "needs Stable Diffusion v1 weights (a download of several GB, never shipped)"
COMPVIS = (
    "names CompVis downloads (models/...), or a real config that needs CompVis' vq-f4 at "
    "models/first_stage_models/vq-f4/model.ckpt and images under data/train"
)
QUICKSTART = (
    "the quick start trains for minutes; tests/test_quickstart.py runs scripts/quickstart.py end to end with "
    "--smoke appended (each --domain, and --weights demo), and main.py -b configs/quickstart/<stage>.yaml -t "
    "is what it runs for each stage"
)
BENCHMARK = "a benchmark: trains or measures for minutes to hours (README gives the time)"
SETUP = "sets up the environment or runs the whole suite: what CI itself runs (.ci/run)"
ELIDED = "its arguments are elided with '...'"
USER_FILES = "needs the user's own files, which tests/test_readme_run.py does not stand in for: {}"
RUN_NOT_MADE = "names logs/<run>/ of the training command at README.md:{}, which is not run (the reasons below are its)"
REAL_CONFIG = re.compile(r"^configs/(latesteps_\w+|autoencoder/\w+|latent-diffusion/[\w-]+)\.yaml$")

# The user's files README's commands name, and what tests/test_readme_run.py's sandbox (a temporary folder with the
# clone's scripts/, configs/, weights/ and main.py linked in) puts there instead.  Run folders logs/<name>/ are the run
# an earlier README command made (main.py -n <name>) or else tiny experts; the quick start's checkpoints
# (outputs/quickstart*/checkpoints/) are tiny ones of the quick start's own configs.
STAND_INS: dict[str, str] = {
    "img.png": "a 48x32 crop of scikit-image's coffee",
    "face.png": "a 64x48 crop of scikit-image's astronaut",
    "photo.png": "a 352x160 crop of scikit-image's chelsea (room for README's boxes up to x=340, y=150)",
    "photo_mask.png": "a white rectangle on black, the size of photo.png",
    "big.png": "a 128x96 crop of scikit-image's coffee",
    "masks": "big.png's mask (two white rectangles: two regions)",
    "my_artifacts": "two 32x32 photo crops",
    "clean": "two 32x32 photo crops",
    "data/train": "a few PNGs of random pixels",
    "A.ckpt": "a tiny expert on t in [250, 500)",
    "shapes.ckpt": "a tiny expert on t in [250, 500)",
    "B.ckpt": "a tiny expert on t in [0, 250)",
    "details.ckpt": "a tiny expert on t in [0, 250)",
    "full_range.ckpt": "a tiny model on t in [0, 1000)",
    "outputs/demo_curve/checkpoints/a64.ckpt": "a tiny expert on t in [250, 500)",
    "outputs/demo_curve/checkpoints/b64.ckpt": "a tiny expert on t in [0, 250)",
    "path/to/ldm-celebahq-256": "the tiny full-range model exported to the diffusers layout",
}
RUN_FOLDER = re.compile(r"^logs/<([^<>/]+)>/checkpoints/last\.ckpt$")


def stood_in(path: str) -> bool:
    """Whether tests/test_readme_run.py's sandbox holds a stand-in for the placeholder ``path``."""
    return path.rstrip("/") in STAND_INS or RUN_FOLDER.match(path) is not None


def trained_above(command: Command) -> list[Command]:
    """The ``main.py ... -t`` commands of ``command``'s block that come before it: a ``logs/<run>/`` it names is
    theirs (README's habit: train, then use the run)."""
    return [c for c in COMMANDS if c.block == command.block and c.block and c.line < command.line
            and invocation(c).script == "main.py" and "-t" in invocation(c).args]  # fmt: skip


def why_not_run(command: Command) -> list[str]:
    """Every reason README's ``command`` is not run by tests/test_readme_run.py (empty: it is run)."""
    inv = invocation(command)
    paths = named_paths(inv)
    if any(RUN_FOLDER.match(p) for p in paths):  # a run made by a training command above that is not run itself
        unrun = [c for c in trained_above(command) if why_not_run(c)]
        if unrun:
            return [RUN_NOT_MADE.format(unrun[-1].line)] + why_not_run(unrun[-1])
    script = inv.script or (inv.args[0] if inv.program in SHELLS and inv.args else "")
    reasons = []
    if inv.launcher or command.sbatch:
        reasons.append(CLUSTER)
    devices = [value for flag, value in zip(inv.args, inv.args[1:]) if flag == "--device"]
    if "cuda" in devices + [w.split("=", 1)[1] for w in inv.args if w.startswith("--device=")] or re.fullmatch(
            r"benchmarks/gpu\w*\.sh", script):  # fmt: skip
        reasons.append(GPU)
    if any(p.startswith("models/") or REAL_CONFIG.match(p) for p in paths):
        reasons.append(COMPVIS)
    if any(p.startswith("stable-diffusion") for p in paths):
        reasons.append(SD_WEIGHTS)
    missing = [p for p in paths if placeholder(p) and not p.startswith(("models/", "stable-diffusion")) and not stood_in(p)]
    if missing:
        reasons.append(USER_FILES.format(", ".join(missing)))
    if script == "scripts/quickstart.py" or (script == "main.py" and any(p.startswith("configs/quickstart/") for p in paths)):
        reasons.append(QUICKSTART)
    if script.startswith("benchmarks/"):
        reasons.append(BENCHMARK)
    if "..." in inv.args:
        reasons.append(ELIDED)
    if inv.program in PIPS | RUFFS or inv.module in PYTHON_MODULES:
        reasons.append(SETUP)
    return reasons


def smoke_overrides() -> tuple[str, ...]:
    """main.py's overrides for a few-step run: what ``scripts/quickstart.py --smoke`` appends to each stage."""
    from ldm.train.stages import SMOKE_OVERRIDES

    return tuple(SMOKE_OVERRIDES)


# What tests/test_readme_run.py appends to a README command, by script, so that it runs in seconds on a CPU beside other
# jobs (argparse and main.py's key=value overrides: the last value given wins).  A script missing here has no suffix
# decided yet: tests/test_readme.py fails until it is added (an empty suffix runs the command as written).
RUN_SUFFIX: dict[str, tuple[str, ...]] = {
    "main.py": smoke_overrides(),  # 3 steps, batches of 4, 16 + 8 samples, no image logging
    "scripts/evaluate.py": ("--n-images", "2", "--ddim-steps", "10", "--start-t", "300"),  # 2 images, 10 steps, 1 start
    "scripts/app.py": ("--port", "0", "--device", "cpu", "--outdir", "outputs/app"),  # any free port; asked, then Ctrl+C
    "scripts/refine.py": (),  # tiny images and experts: as written
    "scripts/cache_latents.py": (),
    "scripts/export_weights.py": (),
    "scripts/convert_diffusers.py": (),
    "scripts/degrade.py": (),
}
