"""tests/warm_python.py: a script forked from the warm interpreter sees what ``python script.py`` started fresh sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from warm_python import WarmPool

PROBE = r"""
import atexit, json, os, sys
atexit.register(lambda: print("atexit ran", file=sys.stderr))
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                  "stdin": sys.stdin.read(), "main": __name__, "file": __file__, "spec": __spec__,
                  "warm": "torch" in sys.modules, "own_group": os.getpgid(0) == os.getpid()}))
code = sys.argv[1]
if code == "raise":
    raise ValueError("boom")
sys.exit(code if not code.isdigit() else int(code))
"""
ENV = {**os.environ, "PROBE": "value"}


@pytest.fixture(scope="module")
def pool():
    """A pool of its own that forks from the first request on (the suite's pool may be full, or not yet warm)."""
    warm = WarmPool(size=1, after=1)
    yield warm
    warm.close()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    (root / "scripts").mkdir()
    (root / "scripts" / "probe.py").write_text(PROBE)
    return root


@pytest.mark.parametrize("code", ["0", "3", "a message", "raise"])
def test_a_forked_script_matches_a_fresh_interpreter(pool, probe, code):
    argv = ["scripts/probe.py", code, "--flag"]
    warm = pool.run(argv, cwd=probe, env=ENV, input="from stdin", timeout=300)
    cold = subprocess.run([sys.executable, *argv], cwd=probe, env=ENV, input="from stdin", capture_output=True, text=True)
    assert warm.returncode == cold.returncode == {"0": 0, "3": 3}.get(code, 1)
    seen, fresh = json.loads(warm.stdout), json.loads(cold.stdout)
    assert (seen.pop("warm"), fresh.pop("warm")) == (True, False)  # forked after torch's import, or started anew
    assert (seen.pop("own_group"), fresh.pop("own_group")) == (True, False)  # a timeout kills the script's children
    assert seen == fresh and seen["argv"] == argv and seen["stdin"] == "from stdin"
    assert warm.stderr.endswith("atexit ran\n") and cold.stderr.endswith("atexit ran\n")
    if code == "a message":
        assert warm.stderr == cold.stderr == "a message\natexit ran\n"
    if code == "raise":
        assert "Traceback" in warm.stderr and warm.stderr.endswith("ValueError: boom\natexit ran\n")


def test_a_timeout_kills_the_script_and_the_warm_interpreter_serves_on(pool, probe):
    (probe / "sleep.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        pool.run(["sleep.py"], cwd=probe, env=ENV, timeout=5)
    assert caught.value.stdout == "started\n"
    assert pool.run(["scripts/probe.py", "3"], cwd=probe, env=ENV, timeout=60).returncode == 3


def test_a_request_with_other_startup_settings_starts_fresh(pool, probe):
    """Thread counts, PYTHONPATH and the like are read while an interpreter starts: another set of them is not forked
    from a warm interpreter that read different ones (the pool holds one, for ENV)."""
    pool.run(["scripts/probe.py", "0"], cwd=probe, env=ENV, timeout=300)
    other = pool.run(["scripts/probe.py", "0"], cwd=probe, env={**ENV, "OMP_NUM_THREADS": "7"}, timeout=60)
    same = pool.run(["scripts/probe.py", "0"], cwd=probe, env={**ENV, "PROBE": "other"}, timeout=60)
    assert json.loads(other.stdout)["warm"] is False
    assert json.loads(same.stdout)["warm"] is True and json.loads(same.stdout)["probe"] == "other"
