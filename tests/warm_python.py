"""``python script.py args`` for the tests, without paying for the imports of torch and Lightning at each start.

A command-line test runs its script in a process of its own, as ``subprocess.run([sys.executable, script, ...])``
does, but that process is forked from a *warm* interpreter that has already imported torch, Lightning, transformers
and ``ldm`` (most of a CLI's start-up time).  The forked process then runs the script as ``python script.py`` would:
in a fresh ``__main__``, with its own ``sys.argv``, ``sys.path[0]`` (the script's folder), working folder,
environment, standard streams and process group, and it exits through the interpreter's own exit (``atexit``
handlers, uncaught exceptions printed, ``SystemExit`` codes).

What a fork cannot give is a fresh start: settings read while an interpreter starts (``PYTHONPATH``, thread counts,
offline flags, ``sitecustomize``) come from the warm interpreter, so each set of such variables (:data:`STARTUP`) has
a warm interpreter of its own (:class:`WarmPool`).  Tests of what happens while a script starts (imports, a signal
during start-up) and of signals sent to a running script call ``subprocess`` themselves.
``LATESTEPS_TEST_FRESH=1`` starts a fresh interpreter for every command.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Environment variables read while an interpreter starts or imports torch/Lightning/transformers: a forked process
# inherits what the warm interpreter read, so they must match (the rest is set in the child before its script runs).
STARTUP = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "CUDA", "LD_", "HF_", "TRANSFORMERS_",
           "PL_", "LIGHTNING", "NO_NET_LOG", "MPLBACKEND")  # fmt: skip
PRELOAD = (
    "import torch, pytorch_lightning, omegaconf, PIL.Image, matplotlib.pyplot, ldm.refine, ldm.util, ldm.checkpoint, "
    "ldm.train.cli, ldm.eval.metrics, ldm.eval.sweep"
)
MAX_WARM = 3  # warm interpreters per test process (each holds torch, Lightning and ldm; its children share it copy-on-write)

WARM = r"""
import importlib.machinery, json, os, sys, types
exec(sys.argv[1])  # the imports every command pays for otherwise


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        print(json.dumps({"pid": pid}), flush=True)
        print(json.dumps({"code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
    return None


request = serve()
if request is not None:  # the command's own process, as `python script.py args` starts it
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(request["stdin"], os.O_RDONLY), 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdin = sys.__stdin__ = open(0, closefd=False, encoding=sys.stdin.encoding, errors=sys.stdin.errors)
    sys.argv = list(request["argv"])
    script = os.path.abspath(sys.argv[0])  # __main__.__file__ is absolute, as Python 3.9+ makes it
    sys.path.insert(0, os.path.dirname(script))
    del request
    main = sys.modules["__main__"] = types.ModuleType("__main__")  # a fresh __main__, as the interpreter makes it
    main.__file__, main.__cached__, main.__package__, main.__spec__ = script, None, None, None
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    with open(script, "rb") as source:
        code = compile(source.read(), script, "exec")
    exec(code, vars(main))
"""


class _Warm:
    """One warm interpreter: forks a process per request and reports its pid, then its exit code."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", WARM, PRELOAD], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)  # fmt: skip

    def reply(self, timeout: float | None) -> dict:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm interpreter exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, request: dict, timeout: float | None) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = self.reply(300)["pid"]  # the first request waits for the imports
        try:
            return self.reply(timeout)["code"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self.reply(30)
            raise

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class WarmPool:
    """Warm interpreters by startup environment: at most ``size``, each made the ``after``-th time its set of
    :data:`STARTUP` variables is asked for (a set asked for once, such as a test's own ``sitecustomize``, stays cold)."""

    def __init__(self, size: int = MAX_WARM, after: int = 2):
        self.size, self.after = size, after
        self.warm: dict[tuple, _Warm] = {}
        self.asked: dict[tuple, int] = {}

    def _warm_for(self, env: dict[str, str]) -> _Warm | None:
        key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP)))
        self.asked[key] = self.asked.get(key, 0) + 1
        if key not in self.warm:
            if self.asked[key] < self.after or len(self.warm) >= self.size or os.environ.get("LATESTEPS_TEST_FRESH") == "1":
                return None
            self.warm[key] = _Warm(env)
        return self.warm[key]

    def run(
        self,
        argv: list,
        *,
        cwd: str | os.PathLike,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, input=input, capture_output=True, text=True,
        timeout=timeout)``, forked from a warm interpreter when one fits ``env``.

        ``argv[0]`` is the script (a path, relative to ``cwd`` or absolute); interpreter options (``-c``, ``-m``) start
        a fresh interpreter.  On timeout the process group is killed and ``subprocess.TimeoutExpired`` raised."""
        env = dict(os.environ if env is None else env)
        command = [sys.executable, *map(str, argv)]
        warm = None if command[1].startswith("-") else self._warm_for(env)
        if warm is None:
            return subprocess.run(command, cwd=cwd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
        with tempfile.TemporaryDirectory(prefix="warm-run-") as tmp:
            stdin, out, err = Path(tmp, "stdin"), Path(tmp, "stdout"), Path(tmp, "stderr")
            stdin.write_text(input or "")
            request = {"argv": command[1:], "cwd": str(Path(cwd).resolve()), "env": env}
            request.update(stdin=str(stdin), stdout=str(out), stderr=str(err))
            try:
                code = warm.run(request, timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def close(self) -> None:
        for warm in self.warm.values():
            warm.close()
        self.warm.clear()


_POOL = WarmPool()  # this test process's (each xdist worker has its own)
atexit.register(_POOL.close)
run_python = _POOL.run
