"""README as tests (issue 27): every command in README.md's ```bash blocks is checked, so a README edit that breaks a
command fails CI.

- The blocks are parsed into commands (``\\`` continuations joined, trailing ``# comments`` stripped, ``&&`` chains
  split, ``#SBATCH`` directives and ``export`` lines skipped), each with its README line for the messages.
- A command that runs an entry point of this repository (``scripts/*.py``, ``benchmarks/*.py``, ``main.py``, directly,
  through ``.venv/bin/python`` or under ``torchrun``/``srun``) names a file that exists, and its arguments parse with
  that script's own parser, without running the work (arguments elided with ``...`` are skipped, saying so); for
  ``main.py`` and ``cache_latents.py`` the configs and ``key=value`` overrides also merge as the script merges them
  (every key checked), ``my_cached_data.yaml`` being README's own ```yaml overlay.  Commands quoted in the prose's
  `code spans` (``python benchmarks/bench_refine.py ...``) get the same parse and path checks.
- Every path a command names is a file of the repository (``configs/``, ``scripts/``, ``weights/``, ...), a file the
  quick start writes (compared with ``scripts/quickstart.py``'s own names and defaults), something the command itself
  writes (``--outdir``/``--out``), or one of the placeholders of :data:`PLACEHOLDERS` (files a clone cannot hold).
- README's test command is CI's (``.ci/run``), and the quick start is README's first command.
- Commands that are not run here say why (:func:`why_not_run`: a GPU, a CompVis download, a cluster, user files,
  minutes of training); the one that is cheap with a tiny suffix (the web app on the shipped demo experts) is run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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
            raise ValueError(f"README.md:{first}: shell operator(s) {bad} are not understood by tests/test_readme.py's "
                             "parser; extend it (or write the command without them)")
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
        words = words[starts[0]:]
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
        with stop_after_parse_args():
            try:
                module.main(args)
            except _Parsed:
                return
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
    (r"^(img|photo|photo_mask|big|face)\.png$", "the user's image to refine, or its mask"),
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


# ---------------------------------------------------------------------------------------------------------------------
# which commands are not run here, and why (they are still parse-checked above)

CLUSTER = "a cluster launcher (torchrun/srun) or a SLURM batch script: needs several GPUs or SLURM"
GPU = "--device cuda: needs a GPU"
COMPVIS = ("names CompVis downloads (models/...), or a real config that needs CompVis' vq-f4 at "
           "models/first_stage_models/vq-f4/model.ckpt and images under data/train")
USER_FILES = "needs the user's own files or training runs (placeholders: logs/<run>, img.png, A.ckpt, ...)"
QUICKSTART_FIRST = "needs the quick start's checkpoints: minutes of training first"
LONG = "trains or evaluates for minutes to hours (README gives the time)"
SETUP = "sets up the environment or runs the whole suite: what CI itself runs (.ci/run)"
ELIDED = "its arguments are elided with '...'"
REAL_CONFIG = re.compile(r"^configs/(latesteps_\w+|autoencoder/\w+|latent-diffusion/[\w-]+)\.yaml$")


def why_not_run(command: Command) -> list[str]:
    """Every reason README's ``command`` is not run by these tests (empty: nothing keeps it from running)."""
    inv = invocation(command)
    paths = named_paths(inv)
    reasons = []
    if inv.launcher or command.sbatch:
        reasons.append(CLUSTER)
    if "cuda" in [value for flag, value in zip(inv.args, inv.args[1:]) if flag == "--device"] + [
            w.split("=", 1)[1] for w in inv.args if w.startswith("--device=")]:
        reasons.append(GPU)
    if any(p.startswith("models/") or REAL_CONFIG.match(p) for p in paths):
        reasons.append(COMPVIS)
    if any(placeholder(p) for p in paths if not p.startswith("models/")):
        reasons.append(USER_FILES)
    if any(QUICKSTART_PATH.search(p) for p in paths):
        reasons.append(QUICKSTART_FIRST)
    if "..." in inv.args:
        reasons.append(ELIDED)
    if inv.script in ("main.py", "scripts/quickstart.py") or (inv.script or "").startswith("benchmarks/"):
        reasons.append(LONG)
    if inv.program in PIPS | RUFFS or inv.module in PYTHON_MODULES:
        reasons.append(SETUP)
    return reasons


# README commands run for real, each with the suffix that keeps it small and safe beside other jobs: the web app on
# the shipped demo experts serves on a free port, on the CPU, into a temporary folder (README's line serves on 7860
# and writes outputs/app/); it is started, asked /api/info, and stopped with Ctrl+C.
RUN_FOR_REAL: dict[str, Callable[[Path], list[str]]] = {
    ".venv/bin/python scripts/app.py --ckpt demo": lambda tmp: ["--port", "0", "--device", "cpu", "--outdir",
                                                                 str(tmp / "app")],
}

# ---------------------------------------------------------------------------------------------------------------------
# the parser itself


def test_the_parser_joins_continuations_strips_comments_splits_chains_and_skips_directives():
    text = "\n".join([
        "prose",
        "```yaml",
        "```bash",  # inside a yaml block: content, not a bash block
        "```",
        "```bash",
        "#SBATCH --nodes=4",
        "export X=$PWD/logs   # a comment",
        "a --x 1 \\",
        "    --y 'q # not a comment' k=logs/<a run>/x   # a comment",
        "",
        "b && c --z \"#2\"  # more",
        "# a comment line",
        "```",
    ])
    commands = readme_commands(text)
    assert [(c.line, c.argv, c.block, c.sbatch) for c in commands] == [
        (8, ("a", "--x", "1", "--y", "q # not a comment", "k=logs/<a run>/x"), 5, True),
        (11, ("b",), 5, True),
        (11, ("c", "--z", "#2"), 5, True),
    ]
    with pytest.raises(ValueError, match="shell operator"):
        readme_commands("```bash\na | b\n```")
    with pytest.raises(ValueError, match="continuation"):
        readme_commands("```bash\na \\\n```")
    with pytest.raises(ValueError, match="never closed"):
        readme_commands("```bash\na\n")


def test_invocations_find_the_script_under_launchers_and_interpreters():
    def inv(line: str) -> Invocation:
        return invocation(Command(1, tuple(shlex.split(line)), 1))

    assert inv("torchrun --nproc-per-node 8 scripts/x.py --a 1") == Invocation(
        "torchrun", "python", "scripts/x.py", None, ("--a", "1"))
    assert inv("srun --ntasks-per-node 8 python main.py -t") == Invocation("srun", "python", "main.py", None, ("-t",))
    assert inv("OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q") == Invocation(
        None, ".venv/bin/python", None, "pytest", ("-q",))
    assert named_paths(inv("python scripts/x.py --outdir out/a --out=b --ckpt A.ckpt m.p=logs/<r>/x.ckpt c.yaml 5")) == [
        "scripts/x.py", "A.ckpt", "logs/<r>/x.ckpt", "c.yaml"]


def test_readme_has_commands_and_every_block_holds_at_least_one():
    blocks = bash_blocks(readme_text())
    assert len(blocks) >= 10 and len(COMMANDS) >= 20, (len(blocks), len(COMMANDS))
    empty = [start for start, lines in blocks if not block_commands(start, lines)]
    assert not empty, f"README.md: ```bash blocks without a command at lines {empty}"


# ---------------------------------------------------------------------------------------------------------------------
# every command: a known program; an entry point that exists and parses its arguments


def test_every_command_runs_a_program_these_tests_know():
    unknown = []
    for command in COMMANDS + INLINE_COMMANDS:
        inv = invocation(command)
        known = (
            (inv.script is not None and ENTRY_POINT.match(inv.script))
            or (inv.program in SHELLS and re.fullmatch(r"benchmarks/\w+\.sh", inv.args[0]))
            or (inv.module is not None and inv.module in PYTHON_MODULES)
            or (inv.program in PIPS and inv.args[:1] == ("install",))
            or (inv.program in RUFFS and inv.args[:1] == ("check",))
        )
        if not known:
            unknown.append(f"README.md:{command.line}: {command}")
    assert not unknown, ("commands that run no entry point of this repository nor a known tool (extend "
                         "tests/test_readme.py if they are meant):\n" + "\n".join(unknown))


@pytest.mark.parametrize("command", ENTRY_COMMANDS + INLINE_ENTRY_COMMANDS, ids=command_id)
def test_entry_point_exists_and_its_arguments_parse(command):
    inv = invocation(command)
    assert (REPO / inv.script).is_file(), f"README.md:{command.line}: {inv.script} does not exist: {command}"
    if "..." in inv.args:
        pytest.skip(f"README.md:{command.line}: {ELIDED}, so there is nothing to parse")
    problem = parse_problem(inv.script, list(inv.args))
    assert problem is None, f"README.md:{command.line}: {inv.script} refuses README's arguments: {problem}\n{command}"


CONFIG_COMMANDS = [c for c in ENTRY_COMMANDS
                   if invocation(c).script in ("main.py", "scripts/cache_latents.py") and "..." not in invocation(c).args]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=command_id)
def test_configs_and_overrides_merge_as_the_script_merges_them(command, monkeypatch, tmp_path):
    """main.py and cache_latents.py check every override key against the merged configs before any work (a misspelled
    key stops them in one line): README's configs and overrides pass that check, with the same merge."""
    from ldm.train.cli import merge_configs, parse_cli
    from ldm.train.trainer import default_lightning_config
    from ldm.util import ConfigError

    inv = invocation(command)
    monkeypatch.chdir(REPO)
    if inv.script == "main.py":
        opt, dotlist = parse_cli(list(inv.args))
        bases, defaults = list(opt.base), default_lightning_config()
    else:
        args, problem = load_script(inv.script).parse_args(list(inv.args))
        assert problem is None, problem
        bases, dotlist, defaults = list(args.config), list(args.overrides), None
    if CACHED_DATA_YAML in bases:  # README's overlay, as README shows it below the command's block
        overlay = tmp_path / CACHED_DATA_YAML
        overlay.write_text(cached_data_yaml())
        bases = [str(overlay) if base == CACHED_DATA_YAML else base for base in bases]
    users = [base for base in bases if placeholder(base)]
    if users:
        pytest.skip(f"README.md:{command.line}: {users} is the user's own config ({placeholder(users[0])})")
    try:
        merged = merge_configs(bases, dotlist, defaults=defaults)
    except ConfigError as exc:
        pytest.fail(f"README.md:{command.line}: {inv.script} refuses README's configs or overrides: {exc}\n{command}")
    if any(base.endswith(CACHED_DATA_YAML) for base in bases):  # README: its params replace the image dataset's
        train = merged.data.params.train
        assert train.target == "ldm.data.cached_latents.CachedLatents" and set(train.params) == {"root"}, train


CACHED_DATA_YAML = "my_cached_data.yaml"


def cached_data_yaml() -> str:
    """README's ```yaml block that swaps the training dataset for cached latents (what my_cached_data.yaml holds)."""
    blocks = [block for _, block in bash_blocks(readme_text(), "yaml")
              if any("ldm.data.cached_latents.CachedLatents" in line for _, line in block)]
    assert blocks, "README has no ```yaml block with ldm.data.cached_latents.CachedLatents (my_cached_data.yaml)"
    return "\n".join(line for _, line in blocks[0]) + "\n"


def test_python_modules_and_pip_installs_name_what_exists():
    setup_call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                      if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    extras = next(ast.literal_eval(k.value) for k in setup_call.keywords if k.arg == "extras_require")
    problems = []
    for command in COMMANDS:
        inv = invocation(command)
        if inv.module is not None and importlib.util.find_spec(inv.module) is None:
            problems.append(f"README.md:{command.line}: python -m {inv.module}: no such module")
        if inv.program in PIPS:
            for flag, value in zip(inv.args, inv.args[1:]):
                if flag == "-e":
                    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", value)
                    missing = set((match.group(1) or "").split(",")) - set(extras) - {""} if match else {value}
                    if missing:
                        problems.append(f"README.md:{command.line}: pip install -e {value}: setup.py has no "
                                        f"{sorted(missing)} (extras: {sorted(extras)})")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize("command", COMMANDS + INLINE_COMMANDS, ids=command_id)
def test_every_path_a_command_names_exists_or_is_a_known_placeholder(command):
    inv = invocation(command)
    problems = [problem for path in named_paths(inv) if (problem := path_problem(path))]
    for flag, value in zip(inv.args, inv.args[1:]):
        if flag == "--ckpt" and not PATH_LIKE.search(value) and value != "...":  # a short name: shipped weights
            from ldm.checkpoint import CheckpointError
            from ldm.refine.shipped import shipped_files

            try:
                shipped_files(value)  # a known name whose files are in the clone, each with its sha256
            except CheckpointError as exc:
                problems.append(str(exc))
    assert not problems, f"README.md:{command.line}: {command}\n" + "\n".join(problems)


def test_every_quick_start_path_in_readme_is_one_it_writes():
    """Anywhere in README, not only in commands: ``outputs/quickstart/table.md``, ``.../checkpoints/vq_f4.ckpt``."""
    problems = []
    for number, line in enumerate(readme_text().splitlines(), 1):
        for match in QUICKSTART_PATH.finditer(line):
            problem = quickstart_path_problem(match.group(0))
            if problem:
                problems.append(f"README.md:{number}: {match.group(0)}: {problem}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------------
# the quick start and the test command


def test_the_quick_start_is_the_first_command_and_runs_quickstart_py():
    text = readme_text()
    first_block = bash_blocks(text)[0][0]
    quick_start = text.splitlines().index("## Quick start") + 1
    assert first_block > quick_start, f"README.md:{first_block}: the first ```bash block is not under '## Quick start'"
    chain = [c for c in COMMANDS if c.block == first_block]
    assert invocation(chain[-1]).script == "scripts/quickstart.py", f"README.md:{first_block}: {chain[-1]}"


def test_readme_test_command_is_exactly_the_last_command_of_ci_run():
    text = readme_text()
    lines = text.splitlines()
    tests_line = next(i for i, line in enumerate(lines, 1) if line.startswith("Tests —"))
    start, block = next((start, block) for start, block in bash_blocks(text) if start > tests_line)
    code = [line for _, line in block if strip_comment(line).strip()]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert code == [ci[-1]], f"README.md:{start}: the test command {code} is not .ci/run's last line {ci[-1]!r}"
    assert invocation([c for c in COMMANDS if c.block == start][-1]).module == "pytest"


# ---------------------------------------------------------------------------------------------------------------------
# what is not run, and the one command that is


def test_every_command_is_run_here_or_says_why_not():
    unmarked = [f"README.md:{c.line}: {c}" for c in COMMANDS if not why_not_run(c) and str(c) not in RUN_FOR_REAL]
    assert not unmarked, ("README commands neither run by tests/test_readme.py nor marked with why not (add them to "
                          "RUN_FOR_REAL or a reason to why_not_run):\n" + "\n".join(unmarked))
    by_line = {c.line: why_not_run(c) for c in COMMANDS}
    for command in COMMANDS:  # the marks the task asks for
        inv = invocation(command)
        if inv.launcher or command.sbatch:
            assert CLUSTER in by_line[command.line], command
        if any(p.startswith("models/ldm/") for p in named_paths(inv)):
            assert COMPVIS in by_line[command.line], command
    assert not set(RUN_FOR_REAL) - {str(c) for c in COMMANDS}, "RUN_FOR_REAL names a command README no longer has"


@pytest.mark.parametrize("command", [c for c in COMMANDS if str(c) in RUN_FOR_REAL], ids=command_id)
def test_cheap_commands_run_for_real(command, tmp_path):
    """README's app line on the shipped demo experts serves (GET /api/info lists both experts) and stops on Ctrl+C
    with exit 0."""
    inv = invocation(command)
    argv = [sys.executable, inv.script, *inv.args, *RUN_FOR_REAL[str(command)](tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
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
        with urllib.request.urlopen(url.group(1).decode() + "api/info", timeout=30) as response:
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
