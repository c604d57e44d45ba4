"""How often does a two-process gloo run abort at exit, by how it ends? torch alone, no distalign model.

Each launch starts two processes (torchrun), runs 50 all-reduces of fresh Python tensors over two
gloo groups, then ends in one of three ways:

  plain         returns from the script (interpreter finalisation)
  barrier       a barrier on every group first, then returns (what Engine.finish does)
  exit_process  the barrier, then distalign.train.distributed.exit_process(0) (what the distalign
                command and ``python -m distalign`` do)

and counts the launches that exited non-zero and those whose output holds "terminate called without
an active exception". gloo's worker threads release a collective's tensors a moment after the caller
saw it finish; a thread that needs the GIL for that while the interpreter is finalising is killed
inside C++, and the process aborts. The window is short, so the race shows under load: --load N runs
N busy loops beside the launches.

    python benchmarks/exit_race.py                         # 100 launches per ending, 3 busy loops
    python benchmarks/exit_race.py --endings plain --launches 20 --load 0
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

ABORT = "terminate called without an active exception"
ENDINGS = ("plain", "barrier", "exit_process")


def worker(ending: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    groups = [None, dist.new_group(backend="gloo")]
    for i in range(50):
        tensor = torch.randn(4096)
        dist.all_reduce(tensor, group=groups[i % 2])
        del tensor  # the worker thread may now hold the last reference
    if ending != "plain":
        for group in groups:
            dist.barrier(group=group)
    if ending == "exit_process":
        from distalign.train.distributed import exit_process

        exit_process(0)


def busy() -> None:
    while True:
        pass


def launch(ending: str) -> tuple[int, bool]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, "--worker", ending]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    return result.returncode, ABORT in result.stdout + result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endings", default=",".join(ENDINGS))
    parser.add_argument("--launches", type=int, default=100)
    parser.add_argument("--load", type=int, default=3, help="busy-loop processes beside the launches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    endings = args.endings.split(",")
    unknown = sorted(set(endings) - set(ENDINGS))
    if unknown:
        parser.error(f"unknown ending(s) {unknown}; choose from {', '.join(ENDINGS)}")
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    rows = []
    try:
        for ending in endings:
            started, failed, aborted = time.perf_counter(), 0, 0
            for _ in range(args.launches):
                code, abort = launch(ending)
                failed += code != 0
                aborted += abort
                print("A" if abort else ("F" if code else "."), end="", flush=True)
            print(f" {ending}")
            rows.append((ending, failed, aborted, (time.perf_counter() - started) / args.launches))
    finally:
        for hog in hogs:
            hog.terminate()
    print(
        f"\n{'ending':<14} {'launches':>8} {'exit != 0':>9} {'aborts':>6} {'s/launch':>8}   (load: {args.load})"
    )
    for ending, failed, aborted, seconds in rows:
        print(f"{ending:<14} {args.launches:>8} {failed:>9} {aborted:>6} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
