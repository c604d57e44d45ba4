"""What splitting the demo's batch of 16 pairs into micro-batches costs in time (``docs/benchmarks.md``,
"Demo memory").

    python benchmarks/demo_micro_batch_speed.py DATA.jsonl [--repeats 4] [--micro-batches 16 4 2]

Loads the demo's DPO arm (SmolLM2-135M-Instruct, LoRA r=16 on every linear layer) and times, for each
micro-batch size, one forward + backward over 16 pairs and one forward without gradients over them (what
AOT's global coupling adds per step when the batch is split, and what the reference precompute and the
dominance summary cost per 16 pairs). Sizes alternate, in reverse order every other repetition, and
each repetition takes another 16 rows, so a busy machine slows all of them alike; medians are printed.
DATA.jsonl: the demo's pairs (``runs/demo/data/sentiment_pairs.jsonl``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch is imported

import torch  # noqa: E402

from distalign.config import load_config  # noqa: E402
from distalign.models.logprobs import batch_logprobs  # noqa: E402
from distalign.train.engine import Engine  # noqa: E402
from distalign.train.objective import build_objective  # noqa: E402
from distalign.train.setup import load_offline_data, load_policy, wrap_for_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[16, 4, 2])
    parser.add_argument("--output-dir", default="/tmp/demo_micro_batch_speed")
    args = parser.parse_args()

    config = load_config("configs/demo_dpo.yaml", [f"data.path={args.data}", f"output_dir={args.output_dir}"])
    engine = Engine(config)
    policy, tokenizer = load_policy(config)
    data = load_offline_data(config, tokenizer, build_objective(config), engine)
    model = wrap_for_training(policy, config)
    model.train()

    def seconds(rows: list[int], micro_batch: int, with_grad: bool) -> float:
        started = time.perf_counter()
        for start in range(0, len(rows), micro_batch):
            batch = data.collate(rows[start : start + micro_batch])
            if with_grad:
                logps, _ = batch_logprobs(model, batch)
                logps.sum().backward()
            else:
                with torch.no_grad():
                    batch_logprobs(model, batch)
        return time.perf_counter() - started

    cases = [(size, grad) for size in args.micro_batches for grad in (True, False)]
    for size, grad in cases:  # warm-up: first shapes, first allocations
        seconds(list(range(16)), size, grad)
    times: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
    groups = max(1, len(data) // 16)
    for repeat in range(args.repeats):
        rows = list(range(16 * (repeat % groups), 16 * (repeat % groups) + 16))
        for case in cases if repeat % 2 == 0 else cases[::-1]:
            times[case].append(seconds(rows, *case))
    print(
        f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; {args.repeats} repetitions"
    )
    print("| micro-batch (pairs) | fwd+bwd of 16 pairs, s | no-grad fwd of 16 pairs, s |")
    print("|---|---|---|")
    for size in args.micro_batches:
        print(
            f"| {size} | {statistics.median(times[(size, True)]):.2f} | {statistics.median(times[(size, False)]):.2f} |"
        )


if __name__ == "__main__":
    main()
