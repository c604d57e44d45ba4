"""How a process of a distributed run ends: its group torn down at exit, or no interpreter finalisation
at all (exit_process; see their docstrings)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distalign.train.distributed import destroy_process_group_if_initialized


def test_destroys_an_initialized_group_and_is_idempotent():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    destroy_process_group_if_initialized()
    assert not dist.is_initialized()
    destroy_process_group_if_initialized()  # nothing left to destroy: a no-op, not an error


def test_exit_process_without_a_process_group_is_a_normal_exit():
    from distalign.train.distributed import exit_process

    with pytest.raises(SystemExit) as info:
        exit_process(3)
    assert info.value.code == 3


ENDS = """
import sys
import pytest
import torch.distributed as dist
from distalign.train.distributed import exit_process
dist.init_process_group("gloo")
dist.all_reduce(__import__("torch").ones(8))
print("printed without a flush")
exit_process(int(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 3])
def test_a_process_of_a_distributed_run_ends_with_its_code_and_its_output(tmp_path, code):
    """exit_process skips interpreter finalisation (where gloo's threads abort the process), not the
    exit code or what was printed."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ends.py"
    script.write_text(ENDS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), str(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.stdout.count("printed without a flush") == 2
    assert (result.returncode == 0) == (code == 0)
    if code:
        assert f"exitcode  : {code}" in result.stderr
