"""README as tests, part one: every command in README.md's ```bash blocks (and those its prose quotes) is parsed and
checked, so that a README edit that breaks a command fails CI; tests/test_readme_run.py runs them (the parser and the
run policy are tests/readme_support.py).

- A command that runs an entry point of this repository names a file that exists, and its arguments parse with that
  script's own parser, without running the work (arguments elided with ``...`` are skipped, saying so); for
  ``main.py`` and ``cache_latents.py`` the configs and ``key=value`` overrides also merge as the script merges them
  (every key checked), ``my_cached_data.yaml`` being README's own ```yaml overlay.
- Every path a command names is a file of the repository (``configs/``, ``scripts/``, ``weights/``, ...), a file the
  quick start writes (compared with ``scripts/quickstart.py``'s own names and defaults), something the command itself
  writes (``--outdir``/``--out``), or one of the placeholders of ``PLACEHOLDERS`` (files a clone cannot hold).
- README's test command is CI's (``.ci/run``), and the quick start is README's first command.
- Every command is run by tests/test_readme_run.py (with the suffix of ``RUN_SUFFIX`` for its script) or says why not
  (``why_not_run``: a GPU, a CompVis download, a cluster, minutes of training run elsewhere with ``--smoke``).
"""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest

from readme_support import (
    CACHED_DATA_YAML,
    CLUSTER,
    COMMANDS,
    COMPVIS,
    ELIDED,
    ENTRY_COMMANDS,
    ENTRY_POINT,
    INLINE_COMMANDS,
    INLINE_ENTRY_COMMANDS,
    PATH_LIKE,
    PIPS,
    PYTHON_MODULES,
    QUICKSTART,
    QUICKSTART_PATH,
    REPO,
    RUFFS,
    RUN_SUFFIX,
    SHELLS,
    Command,
    Invocation,
    bash_blocks,
    block_commands,
    cached_data_yaml,
    command_id,
    invocation,
    load_script,
    named_paths,
    parse_problem,
    path_problem,
    placeholder,
    quickstart_path_problem,
    readme_commands,
    readme_text,
    strip_comment,
    why_not_run,
)

# ---------------------------------------------------------------------------------------------------------------------
# the parser itself


def test_the_parser_joins_continuations_strips_comments_splits_chains_and_skips_directives():
    text = "\n".join(
        [
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
            'b && c --z "#2"  # more',
            "# a comment line",
            "```",
        ]
    )
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
        "torchrun", "python", "scripts/x.py", None, ("--a", "1")
    )
    assert inv("srun --ntasks-per-node 8 python main.py -t") == Invocation("srun", "python", "main.py", None, ("-t",))
    assert inv("OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q") == Invocation(
        None, ".venv/bin/python", None, "pytest", ("-q",)
    )
    assert named_paths(inv("python scripts/x.py --outdir out/a --out=b --ckpt A.ckpt m.p=logs/<r>/x.ckpt c.yaml 5")) == [
        "scripts/x.py",
        "A.ckpt",
        "logs/<r>/x.ckpt",
        "c.yaml",
    ]


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
            or (inv.program in RUFFS and inv.args[:1] in (("check",), ("format",)))
        )
        if not known:
            unknown.append(f"README.md:{command.line}: {command}")
    assert not unknown, (
        "commands that run no entry point of this repository nor a known tool (extend "
        "tests/test_readme.py if they are meant):\n" + "\n".join(unknown)
    )


@pytest.mark.parametrize("command", ENTRY_COMMANDS + INLINE_ENTRY_COMMANDS, ids=command_id)
def test_entry_point_exists_and_its_arguments_parse(command):
    inv = invocation(command)
    assert (REPO / inv.script).is_file(), f"README.md:{command.line}: {inv.script} does not exist: {command}"
    if "..." in inv.args:
        pytest.skip(f"README.md:{command.line}: {ELIDED}, so there is nothing to parse")
    problem = parse_problem(inv.script, list(inv.args))
    assert problem is None, f"README.md:{command.line}: {inv.script} refuses README's arguments: {problem}\n{command}"


CONFIG_COMMANDS = [
    c
    for c in ENTRY_COMMANDS
    if invocation(c).script in ("main.py", "scripts/cache_latents.py") and "..." not in invocation(c).args
]


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


def test_python_modules_and_pip_installs_name_what_exists():
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with tomllib (Python 3.11+)")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
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
                        problems.append(
                            f"README.md:{command.line}: pip install -e {value}: pyproject.toml has no "
                            f"{sorted(missing)} (extras: {sorted(extras)})"
                        )
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
# what is run, and what is not


def test_every_command_is_run_here_or_says_why_not():
    commands = COMMANDS + INLINE_COMMANDS
    undecided = [f"README.md:{c.line}: {c}" for c in commands
                 if not why_not_run(c) and invocation(c).script not in RUN_SUFFIX]  # fmt: skip
    assert not undecided, (
        "README commands neither run by tests/test_readme_run.py nor marked with why not (give their "
        "script a suffix in RUN_SUFFIX, or why_not_run a reason):\n" + "\n".join(undecided)
    )
    for command in commands:  # the marks the task asks for
        inv, reasons = invocation(command), why_not_run(command)
        if inv.launcher or command.sbatch:
            assert CLUSTER in reasons, command
        if any(p.startswith("models/ldm/") for p in named_paths(inv)):
            assert COMPVIS in reasons, command
    run = {invocation(c).script for c in commands if not why_not_run(c)}
    assert set(RUN_SUFFIX) <= run, f"RUN_SUFFIX names scripts no README command runs: {sorted(set(RUN_SUFFIX) - run)}"


def test_the_quick_start_runs_elsewhere_with_smoke():
    """README's quick-start commands are not run here (minutes of training): tests/test_quickstart.py runs the same
    script with ``--smoke`` for each of their ``--domain``/``--weights``, as :data:`QUICKSTART` says."""
    text = (REPO / "tests" / "test_quickstart.py").read_text()
    quick_starts = [c for c in COMMANDS + INLINE_COMMANDS if invocation(c).script == "scripts/quickstart.py"]
    assert quick_starts and all(QUICKSTART in why_not_run(c) for c in quick_starts)
    assert '"--smoke"' in text
    for command in quick_starts:
        args = invocation(command).args
        for flag, value in zip(args, args[1:]):
            if flag in ("--domain", "--weights"):
                where = f"README.md:{command.line}"
                assert f'"{flag}", "{value}"' in text, f"{where}: tests/test_quickstart.py runs no {flag} {value}"


def test_the_python_api_example_runs_as_written_on_the_cpu(expert_checkpoints, monkeypatch, tmp_path):
    """README's ```python block, line for line, with the test experts under its checkpoint names and the CPU for
    CUDA (bf16 autocast runs there too); the names it leaves to the reader (an image, a mask, a batch, a start map)
    are given.  Only its shell commands were run before, and one API line failed as written."""
    import numpy as np
    import torch
    from PIL import Image

    blocks = bash_blocks(readme_text(), "python")
    assert blocks, "README has no ```python block"
    for name, path in zip(["shapes_500_750.ckpt", "details_750_1000.ckpt"], expert_checkpoints):
        (tmp_path / name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for start, lines in blocks:
        source = "\n".join(line for _, line in lines)
        assert source.count('device="cuda"') <= 1
        names = {
            "pil_image": Image.fromarray(rng.integers(0, 256, (160, 136, 3), dtype=np.uint8)),
            "mask_image": Image.fromarray(np.pad(np.full((40, 40), 255, np.uint8), ((60, 60), (48, 48)))),  # 160 x 136
            "x": torch.rand(4, 3, 32, 32) * 2 - 1,
            "starts": torch.full((1, 1, 32, 32), 300),
        }
        exec(compile(source.replace('device="cuda"', 'device="cpu"'), f"README.md:{start}", "exec"), names)
        assert names["batch"].shape == (4, 3, 32, 32) and names["fixed"].size == (136, 160)
