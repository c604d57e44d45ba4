"""``distalign sweep``: train, evaluate and compare a set of runs (a sweep file, or a config and a grid)."""

from __future__ import annotations

import argparse
import sys

SWEEP_EPILOG = """\
A sweep file (YAML; `base` is relative to the sweep file):
  base: upo_tiny.yaml
  output_dir: runs/upo_sweep/tiny          # each run goes to OUTPUT_DIR/<run name>
  overrides: [train.max_steps=4]           # optional, every run
  runs:
    - name: dpo
      set: {loss.name: dpo}
    - name: upo
      set: {loss.name: upo}
      grid: {loss.lambda_aux: [0.5, 1.0, 2.0]}   # -> upo-lambda_aux=0.5, upo-lambda_aux=1.0, ...

Examples:
  distalign sweep configs/sweeps/upo_tiny.yaml --dry-run          # list and validate the runs, train nothing
  distalign sweep configs/sweeps/upo_tiny.yaml train.max_steps=4  # an override for every run
  distalign sweep configs/sweeps/upo_tiny.yaml --only upo         # one group (or run) only
  distalign sweep configs/quickstart.yaml --grid loss.beta=0.05,0.1,0.5 --output-dir runs/beta
Rerunning the same command continues where it stopped; a finished sweep redoes nothing. See docs/sweep.md.
"""


def _add_options(parser: argparse.ArgumentParser) -> None:
    """The options, shared by the registered sub-command (before the config) and the parser of what
    follows it (options may stand anywhere among the config and its overrides)."""
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="with a run config: sweep KEY over the comma-separated values (repeat for a cartesian product)",
    )
    parser.add_argument(
        "--output-dir", metavar="DIR", help="where the runs go (default: the sweep file's output_dir)"
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this run or group (repeatable)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list and validate the runs; train nothing")
    parser.add_argument("--no-eval", action="store_true", help="train only; do not evaluate")


def _parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Parse what followed the sub-command's leading options into ``args`` (repeated options add up)."""
    inner = argparse.ArgumentParser(prog="distalign sweep", usage=args.sweep_parser.usage, add_help=False)
    _add_options(inner)
    inner.add_argument("target", metavar="SWEEP_FILE_OR_CONFIG")
    inner.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    items = args.items
    del args.items
    return inner.parse_intermixed_args(items, namespace=args)


def cmd_sweep(args: argparse.Namespace) -> int:
    if any(item in ("-h", "--help") for item in args.items):
        args.sweep_parser.print_help()
        return 0
    if not args.items:
        args.sweep_parser.error("give a sweep file, or a run config with --grid options")
    args = _parse_rest(args)
    from distalign.sweep import load_sweep, select_runs
    from distalign.sweep_run import format_table, planned_action, run_sweep

    sweep = load_sweep(args.target, args.overrides, grid=args.grid, output_dir=args.output_dir)
    runs = select_runs(sweep, args.only)
    if args.dry_run:
        return _dry_run(sweep, runs, evaluate=not args.no_eval, planned=planned_action)
    print(f"sweep: {len(runs)} of {len(sweep.runs)} runs into {sweep.output_dir}", flush=True)
    records = run_sweep(sweep, runs, evaluate=not args.no_eval, log=lambda line: print(line, flush=True))
    print()
    print(format_table(records))
    print(f"\nwrote {sweep.output_dir / 'sweep.json'}", end="")
    report = sweep.output_dir / "report.html"
    print(f" and {report}" if report.is_file() else "")
    failed = [r for r in records if r.error is not None]
    if failed:
        names = ", ".join(r.name for r in failed)
        print(
            f"distalign: error: {len(failed)} of {len(runs)} runs failed ({names}); see above",
            file=sys.stderr,
        )
        return 2
    return 0


def _dry_run(sweep, runs, *, evaluate: bool, planned) -> int:
    """Print each selected run, its overrides and what a real run would do; exit 2 if one would be refused."""
    print(f"sweep {sweep.source}: {len(runs)} of {len(sweep.runs)} runs into {sweep.output_dir} (all valid)")
    if sweep.overrides:
        print(f"every run: {' '.join(sweep.overrides)}")
    refused = 0
    for run in runs:
        action = planned(run, evaluate=evaluate)
        refused += action.startswith("refused:")
        print(f"  {run.name}: {' '.join(run.overrides) or '(base config)'}\n    -> {action}")
    if refused:
        print(f"distalign: error: {refused} run(s) would be refused (see above)", file=sys.stderr)
        return 2
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` command."""
    sweep = commands.add_parser(
        "sweep",
        help="train, evaluate and compare a set of runs (a sweep file, or a config with --grid); resumable",
        usage="%(prog)s [-h] [--grid KEY=V1,V2] [--output-dir DIR] [--only NAME] [--dry-run] [--no-eval] "
        "SWEEP_FILE_OR_CONFIG [KEY=VALUE ...]",
        description="Expand a sweep into runs and validate every run's config before anything trains; then, "
        "for each run in order, train it (resuming from its checkpoints) and evaluate it into RUN/eval/ "
        "(the reference's samples drawn once and shared by runs with the same reference and eval settings). "
        "Writes OUTPUT_DIR/sweep.json (each run: name, overrides, status, path, win rate, designer score) "
        "and OUTPUT_DIR/report.html (with the designer-score vs win-rate Pareto view when runs have "
        "designer scores). A run already trained and evaluated with the same settings is skipped. KEY=VALUE "
        "overrides apply to every run (after the sweep file's overrides; a run's set/grid win).",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(sweep)
    sweep.add_argument("items", nargs=argparse.REMAINDER, metavar="SWEEP_FILE_OR_CONFIG [KEY=VALUE ...]")
    sweep.set_defaults(handler=cmd_sweep, sweep_parser=sweep)
