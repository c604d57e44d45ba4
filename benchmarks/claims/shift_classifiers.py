"""DoRA's density-ratio classifiers on the wide shift task: logistic probe on frozen MiniLM embeddings
vs a fine-tuned MiniLM classifier, each one-vs-golden and multinomial. Prints the per-source table
of docs/claims.md (held-out accuracy, ECE, NLL; mean h of held-out golden and source rows).

    python scripts/make_shift_data.py --out-dir runs/shift_wide                 # the data (resumable)
    python benchmarks/claims/shift_classifiers.py runs/shift_wide/shift_wide.jsonl --out runs/shift_classifiers

Each fit is one ``distalign shift fit`` command into its own folder under ``--out`` (a rerun reads the
folders back and prints the table again at once; the fit times are the ones measured then); the
commands are printed so any cell can be reproduced alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLASSIFIERS = ("logistic", "hf:minilm")
SCHEMES = ("one-vs-golden", "multinomial")
TARGET = "golden"


def fit(data: Path, out: Path, classifier: str, scheme: str, extra: list[str]) -> tuple[dict, float]:
    """Run one fit (or read it back when it was run before); (summary, the fit's wall seconds)."""
    summary_path, seconds_path = out / "shift_summary.json", out / "fit_seconds.txt"
    if summary_path.is_file() and seconds_path.is_file():
        return json.loads(summary_path.read_text()), float(seconds_path.read_text())
    command = [
        sys.executable, "-m", "distalign", "shift", "fit", str(data), "--target", TARGET,
        "--classifier", classifier, "--scheme", scheme, "--output", str(out), *extra,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    seconds_path.write_text(f"{seconds:.1f}\n")
    return json.loads(summary_path.read_text()), seconds


def table(results: dict[tuple[str, str], tuple[dict, float]]) -> str:
    lines = [
        "| classifier | scheme | source | held-out acc | ECE | NLL | mean h, held-out golden rows | mean h, "
        "held-out source rows | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (classifier, scheme), (summary, seconds) in results.items():
        golden_h = summary["sources"][TARGET]["density_ratio_mean_heldout_rows"]
        for source, report in summary["classifiers"].items():
            held = report["heldout"]
            source_h = summary["sources"][source]["density_ratio_mean_heldout_rows"]
            lines.append(
                f"| {classifier} | {scheme} | {source} | {held['accuracy']:.3f} | {held['ece']:.3f} | "
                f"{held['nll']:.3f} | {golden_h:.2f} | {source_h:.2f} | {seconds:.0f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="shift data with a `source` column (golden + synthetic)")
    parser.add_argument("--out", type=Path, default=Path("runs/shift_classifiers"))
    parser.add_argument("--classifiers", nargs="+", default=list(CLASSIFIERS))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("extra", nargs="*", help="after --: more `shift fit` options, the same for every fit")
    args = parser.parse_args()
    results = {}
    for classifier in args.classifiers:
        for scheme in args.schemes:
            out = args.out / f"{classifier.replace(':', '_')}-{scheme}"
            results[(classifier, scheme)] = fit(args.data, out, classifier, scheme, args.extra)
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
