"""Script: train, then write the dominance summary over ONE row (fewer rows than processes).
``torchrun ... summary_probe.py KEY=VALUE ...``"""

import sys

import distalign.train.offline as offline
from distalign.config import load_config
from distalign.train.distributed import exit_process

if __name__ == "__main__":
    summarise = offline.write_dominance_summary
    offline.write_dominance_summary = lambda engine, compute, num_rows, micro: summarise(
        engine, compute, num_rows, micro, max_rows=1
    )
    offline.train_offline(load_config(None, sys.argv[1:]))
    exit_process(0)
