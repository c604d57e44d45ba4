"""Script: start the engine (the process group), then let rank 1 load the policy well before rank 0.
Where the tiny model is first built at that load, rank 1 builds it under the process group, and
transformers (5.24 and 5.25 at least) saves no weights there.
``torchrun ... cache_build_probe.py KEY=VALUE ...``"""

import sys
import time

import torch.distributed as dist

from distalign.config import load_config
from distalign.train.distributed import exit_process
from distalign.train.engine import Engine
from distalign.train.setup import load_policy

if __name__ == "__main__":
    config = load_config(None, sys.argv[1:])
    engine = Engine(config)
    if engine.rank == 0:
        time.sleep(3)
    load_policy(config)
    dist.barrier()
    exit_process(0)
