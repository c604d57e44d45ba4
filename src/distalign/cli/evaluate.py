"""``distalign eval``, ``distalign report`` and ``distalign demo``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from distalign.cli.common import split_config_and_overrides

EVAL_EPILOG = """\
Examples:
  distalign eval runs/aot                                  # RUN_DIR/final against the run's reference
  distalign eval runs/aot eval.num_prompts=16 eval.samples_per_prompt=4
  distalign eval configs/quickstart.yaml                   # the untrained model against itself (baseline)
Settings live in the config's `eval:` section (task, num_prompts, samples_per_prompt, max_new_tokens,
batch_size, seed, n_boot, alpha, chat_template); see src/distalign/config/evaluation.py.
"""


def cmd_eval(args: argparse.Namespace) -> int:
    from distalign.config import ConfigError
    from distalign.eval.run import evaluate_target
    from distalign.stats.metrics import EvalResult

    target, overrides = split_config_and_overrides(args.target_and_overrides)
    if target is None:
        raise ConfigError("distalign eval needs a run directory or a config file")
    path = evaluate_target(target, overrides, args.output)
    result = EvalResult.load(path)
    print(_eval_lines(result))
    print(f"wrote {path} and plots in {path.parent}")
    return 0


def _eval_lines(result) -> str:
    def show(estimate) -> str:
        return f"{estimate.value:.4g} [{estimate.low:.4g}, {estimate.high:.4g}]"

    lines = [f"task {result.task} ({result.reward}), {result.num_prompts} prompts"]
    for model, estimate in result.gold_reward.items():
        lines.append(f"  gold reward {model:<9} {show(estimate)}")
    if result.win_rate is not None:
        lines.append(f"  win rate vs reference {show(result.win_rate)}")
    if result.kl is not None:
        lines.append(f"  KL(policy || reference) {show(result.kl.k1)} nats")
    for name, entry in result.designer.items():
        label = "designer score (r_aux)" if name == "designer" else f"designer {name}"
        lines.append(
            f"  {label}: policy {show(entry['policy'])}, reference {show(entry['reference'])}, "
            f"difference {show(entry['difference'])}"
        )
    if "tiny" in (result.settings.get("policy"), result.settings.get("reference")):
        lines.append(
            "note: 'tiny' is the randomly initialised test model: these numbers check the pipeline "
            "(plumbing), they say nothing about alignment quality"
        )
    return "\n".join(lines)


def default_report_path(run_dirs: list[Path]) -> Path:
    """One run: RUN_DIR/report.html. Several: report.html in their deepest common directory, or in the
    current directory when that would be the filesystem root."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report.html"
    common = Path(os.path.commonpath([str(p.resolve()) for p in run_dirs]))
    if common == Path(common.anchor):
        return Path("report.html")
    return common / "report.html"


def cmd_report(args: argparse.Namespace) -> int:
    from distalign.config import ConfigError
    from distalign.errors import SetupError
    from distalign.eval.report import write_report
    from distalign.eval.run_dir import not_a_run_directory

    run_dirs = [Path(p) for p in args.run_dirs]
    not_runs = [problem for problem in map(not_a_run_directory, run_dirs) if problem is not None]
    if not_runs:
        raise SetupError(
            f"not a distalign run directory: {'; '.join(not_runs)}. Give the output_dir of a "
            "`distalign train` run (nothing was written)"
        )
    output = args.output or default_report_path(run_dirs)
    if args.interval is not None and not args.watch:
        raise ConfigError("--interval sets how often --watch polls; add --watch")
    if args.watch:
        return _watch_report(run_dirs, output, args.interval if args.interval is not None else 10.0)
    page = write_report(run_dirs, output)
    print(f"report: {page}")
    return 0


def _watch_report(run_dirs: list[Path], output: str | Path, interval: float) -> int:
    """The live view: rewrite the report on change until Ctrl-C, which ends it with exit status 0."""
    import time

    from distalign.config import ConfigError
    from distalign.eval.report import report_paths
    from distalign.eval.watch import watch

    if interval <= 0:
        raise ConfigError(f"--interval {interval} must be positive (seconds)")
    page = report_paths(output)[0]
    print(
        f"report: {page} (open {page.resolve().as_uri()}; it reloads every {interval:g} s)\n"
        f"watching {len(run_dirs)} run(s) every {interval:g} s for new metrics or evaluations; Ctrl-C stops",
        flush=True,
    )

    def written(path: Path) -> None:
        print(f"{time.strftime('%H:%M:%S')} report updated: {path}", flush=True)

    def failed(err: Exception) -> None:
        print(f"{time.strftime('%H:%M:%S')} report not updated ({err!r}); trying again at the next change")

    try:
        watch(run_dirs, output, interval=interval, on_write=written, on_error=failed)
    except KeyboardInterrupt:
        print(f"\nstopped watching; the last report is {page}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distalign.config import ConfigError
    from distalign.demo import format_table, run_demo

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps} must be at least 1")
    output_dir = args.output_dir or ("runs/demo_tiny" if args.tiny else "runs/demo")
    summary = run_demo(output_dir, tiny=args.tiny, steps=args.steps)
    print()
    print(format_table(summary))
    timings = summary.timings
    load = timings["load_average_1min"]
    print(
        f"\nwall time {timings['total']:.0f} s (CPU {timings['cpu_seconds']['total']:.0f} s on "
        f"{timings['cpu_threads']} threads; load average {load['start']} at start, {load['end']} at end)"
    )
    print(f"report: {summary.report}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``eval``, ``report`` and ``demo`` commands."""
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a trained run (or a config's model) on held-out prompts with a gold reward",
        description="Sample the policy and the reference on held-out prompts of the config's eval.task "
        "(exact ancestral sampling) and report the gold-reward mean, the win rate against the reference "
        "(bootstrap CIs over prompts), KL(policy || reference), gold-reward quantile curves (dominance), "
        "diversity (distinct-1/2, self-BLEU) and lengths. With a run directory: RUN_DIR/final against the "
        "run's reference, written to RUN_DIR/eval/. With a config file: its model against itself (a "
        "baseline), written to OUTPUT_DIR/baseline/eval/.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("target_and_overrides", nargs="+", metavar="RUN_DIR_OR_CONFIG [KEY=VALUE ...]")
    evaluate.add_argument(
        "--output",
        help="with a run directory: where eval.json, samples.jsonl and the PNGs go (default RUN_DIR/eval); "
        "with a config: the baseline directory, which gets config.yaml and eval/ (default OUTPUT_DIR/baseline)",
    )
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser(
        "report",
        help="write one self-contained HTML report (plus PNGs) for one or more runs",
        description="Training curves, evaluation tables and plots of each run, and a comparison of all "
        "runs (gold reward, win rate, quantile curves, gold reward vs KL frontier). Images are embedded "
        "in the page and also written to REPORT_files/. Default output: RUN_DIR/report.html for one run, "
        "else report.html in the runs' common parent directory. The page opens with a verdict per run "
        "(does the policy beat the reference, at what KL) and shows example generations of the policies "
        "beside the reference's. --watch keeps it up to date during a long run.",
        epilog="Examples:\n"
        "  distalign report runs/quickstart runs/ipo\n"
        "  distalign report runs/upo/dpo runs/upo/upo --watch --interval 30   # live view; Ctrl-C stops",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--output", help="an .html file, or a directory to write report.html into")
    report.add_argument(
        "--watch",
        action="store_true",
        help="keep running: rewrite the report whenever a run's metrics.jsonl or eval files change "
        "(polling); the page reloads itself in the browser. Ctrl-C stops (exit status 0)",
    )
    report.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="with --watch: how often to look for changes and how often the page reloads (default 10)",
    )
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser(
        "demo",
        help="the main job: sentiment data, DPO and AOT training, evaluation and report on SmolLM2",
        description="On SmolLM2-135M-Instruct with LoRA (about 8 minutes and 2.1 GB of memory on 2 idle CPU cores; a GPU is used when "
        "present): sample sentiment preference pairs from the base model, train DPO and paired AOT with "
        "identical settings, evaluate the reference, DPO and AOT on held-out prompts with the VADER gold "
        "reward, and write an HTML report. --tiny runs the same pipeline on the tiny test model.",
    )
    demo.add_argument("--tiny", action="store_true", help="use the tiny test model (under 2 minutes)")
    demo.add_argument(
        "--output-dir", help="where to write (default runs/demo, or runs/demo_tiny with --tiny)"
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per method (overrides the preset)"
    )
    demo.set_defaults(handler=cmd_demo)
