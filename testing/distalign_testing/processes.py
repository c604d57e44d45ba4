"""Running a launcher and its worker processes as one unit (standard library only: benchmarks import it
before anything else is installed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence


def run_in_own_group(
    command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, with the command in
    a process group of its own that is killed whole on a timeout or an interruption: a launcher's
    children (accelerate's ranks, a worker's data-loader processes) would otherwise outlive it, still
    holding the GPU the next run needs. ``TimeoutExpired`` carries the output written until then."""
    with subprocess.Popen(
        list(command),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException as err:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            try:  # bounded: a process that left the group could still hold the pipes open
                stdout, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stdout, stderr = "", ""
            if isinstance(err, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(list(command), timeout, stdout, stderr) from None
            raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
