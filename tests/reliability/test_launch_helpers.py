"""The multi-process launch helpers the sharded tests use clean up after a hung launch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from distalign_testing.processes import run_in_own_group

# A launcher that starts a worker and then hangs, like `accelerate launch` whose workers wait on a lock.
HANGING_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(worker.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of an exited parent may linger as a zombie until reaped
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_a_timed_out_launch_kills_its_workers_too():
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_in_own_group([sys.executable, "-c", HANGING_LAUNCHER], timeout=5, env=dict(os.environ))
    worker = int(timed_out.value.output.split()[0])
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the launcher's worker outlived the timeout"


def test_a_finished_launch_returns_its_output_and_exit_code():
    result = run_in_own_group(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        timeout=30,
        env=dict(os.environ),
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
