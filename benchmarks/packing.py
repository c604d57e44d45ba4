"""Offline DPO steps padded vs packed (data.packing) vs grouped by length (data.group_by_length).

    python benchmarks/packing.py --quick                 # tiny model, a few steps: checks it runs
    python benchmarks/packing.py --model tiny            # tiny model, mixed-length pairs
    python benchmarks/packing.py --model smollm2         # SmolLM2-135M (minutes on 2 CPU cores)

The data are quickstart pairs whose chosen / rejected completions are repeated 1 to 8 times (a fixed
pattern), so sequence lengths differ by up to ~8x within a micro-batch: the case packing is for. Each
mode trains the same steps on the same rows through the real loop (``train_offline``: reference
log-probs precomputed and cached before the first step, so not timed); the modes alternate within
every repetition, so the machine's noise falls on all of them alike. Reported per mode: median
seconds per step after --warmup steps (from metrics.jsonl), the ratio to padded, attended tokens per
second, ``tokens/padding_fraction`` (padded positions / positions processed) and the largest difference
of the logged losses to the padded run's (float32: rounding only; packing is exact).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import distalign_step_times, environment_note, markdown_table  # noqa: E402

from distalign.config import load_config  # noqa: E402
from distalign.data.loading import load_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.runs import read_metrics  # noqa: E402

from distalign.train.offline import train_offline  # noqa: E402

MODES = {
    "padded": [],
    "grouped": ["data.group_by_length=true"],
    "packed": ["data.packing=true"],
    "packed+grouped": ["data.packing=true", "data.group_by_length=true"],
}
PRESETS = {
    # batch, micro-batch, steps, warm-up steps, repetitions, max length, max prompt length
    "tiny": dict(batch=16, micro=8, steps=12, warmup=2, repeats=3, max_length=256, max_prompt=64),
    "smollm2": dict(batch=4, micro=4, steps=6, warmup=1, repeats=2, max_length=256, max_prompt=64),
}
REPEATS = (1, 8, 2, 1, 5, 1, 3, 1)  # completion repetitions, cycled over rows (chosen and rejected offset)


def mixed_length_pairs(path: Path, rows: int) -> Path:
    """Quickstart pairs with completions repeated per ``REPEATS``: lengths differing up to ~8x."""
    source = load_rows("builtin:quickstart_pairs.jsonl", limit=rows).rows
    with path.open("w") as handle:
        for i, row in enumerate(source):
            chosen = " ".join([row["chosen"].strip()] * REPEATS[i % len(REPEATS)])
            rejected = " ".join([row["rejected"].strip()] * REPEATS[(i + 3) % len(REPEATS)])
            record = {"prompt": row["prompt"], "chosen": " " + chosen, "rejected": " " + rejected}
            handle.write(json.dumps(record) + "\n")
    return path


def run_mode(model: str, data: Path, run_dir: Path, preset: dict, mode: str) -> dict:
    overrides = [
        f"model.name={model}",
        f"data.path={data}",
        f"data.max_length={preset['max_length']}",
        f"data.max_prompt_length={preset['max_prompt']}",
        "loss.name=dpo",
        f"train.batch_size={preset['batch']}",
        f"train.micro_batch_size={preset['micro']}",
        f"train.max_steps={preset['steps']}",
        "train.progress=false",
        "train.lr=1e-5",
        f"output_dir={run_dir}",
        *MODES[mode],
    ]
    train_offline(load_config(None, overrides), stop_after_step=preset["steps"])
    times, tokens = distalign_step_times(run_dir)
    measured = times[preset["warmup"] :]
    records = read_metrics(run_dir)
    return {
        "s_per_step": statistics.median(measured),
        "tokens_per_s": sum(tokens[preset["warmup"] :]) / sum(measured),
        "padding": statistics.mean(r["tokens/padding_fraction"] for r in records),
        "losses": [r["loss"] for r in records],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 1 repetition")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS["tiny" if args.quick else args.model])
    if args.quick:
        preset.update(steps=4, warmup=1, repeats=1)
    preset.update({k: v for k, v in (("steps", args.steps), ("repeats", args.repeats)) if v is not None})
    model = "tiny" if args.quick else args.model
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="distalign-packing-") as tmp:
        data = mixed_length_pairs(Path(tmp) / "pairs.jsonl", 4 * preset["batch"] * preset["steps"])
        for repeat in range(preset["repeats"]):
            for mode in MODES:
                run_dir = Path(tmp) / f"{mode}-{repeat}"
                results[mode].append(run_mode(model, data, run_dir, preset, mode))
                print(
                    f"repeat {repeat + 1}: {mode}: {results[mode][-1]['s_per_step']:.3f} s/step", flush=True
                )
    base = statistics.median(r["s_per_step"] for r in results["padded"])
    padded_losses = results["padded"][0]["losses"]
    rows = []
    for mode, runs in results.items():
        seconds = statistics.median(r["s_per_step"] for r in runs)
        drift = max(abs(a - b) for r in runs for a, b in zip(r["losses"], padded_losses))
        rows.append(
            [
                mode,
                f"{seconds:.3f}",
                f"{seconds / base:.2f}",
                f"{statistics.median(r['tokens_per_s'] for r in runs):.0f}",
                f"{runs[0]['padding']:.3f}",
                f"{drift:.1e}",
            ]
        )
    header = ["mode", "s/step (median)", "x padded", "tokens/s", "padding fraction", "max |loss - padded|"]
    print(markdown_table(header, rows))
    print(environment_note())
    print(
        f"model {model}, DPO, batch {preset['batch']}, micro-batch {preset['micro']}, max_length "
        f"{preset['max_length']}, {preset['steps']} steps ({preset['warmup']} warm-up), "
        f"{preset['repeats']} repetition(s), float32"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
