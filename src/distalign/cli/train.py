"""``distalign train``, ``distalign config show`` and ``distalign losses``."""

from __future__ import annotations

import argparse
import os
import sys

from distalign.cli.common import EPILOG_OVERRIDES, load_run_config

OVERWRITE_FLAG = "--overwrite-output-dir"


def cmd_train(args: argparse.Namespace) -> int:
    # The flag may stand anywhere among CONFIG and the overrides; argparse stops matching options at the
    # first override, so the rest arrive here and the flag is picked out of them.
    items = list(args.config_and_overrides)
    if any(item in ("-h", "--help") for item in items):
        args.train_parser.print_help()
        return 0
    overwrite = args.overwrite_output_dir or OVERWRITE_FLAG in items
    items = [item for item in items if item != OVERWRITE_FLAG]
    unknown = [item for item in items if item.startswith("-")]
    if unknown:
        args.train_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config = load_run_config([*items, *(["train.overwrite_output_dir=true"] if overwrite else [])])
    from distalign.train import run_training
    from distalign.train.checkpoints import RunFinished

    try:
        run_dir = run_training(config)
    except RunFinished as finished:  # re-running a finished run succeeds without training (a retry, say)
        if os.environ.get("RANK", "0") == "0":
            print(f"distalign: {finished}", file=sys.stderr)
        return 0
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"run saved to {run_dir} (final model: {run_dir / 'final'})")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from distalign.config import dump_config

    print(dump_config(load_run_config(args.config_and_overrides)), end="")
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from distalign.losses import AGGREGATORS, LOSSES

    print("losses (loss.name; per-example values, reduced by the aggregator):")
    for name in LOSSES:
        spec = LOSSES.get(name)
        flags = [spec.data_kind, "reference" if spec.needs_reference else "reference-free"]
        if spec.batch_coupled:
            flags.append("batch-coupled")
        flags += [f"batch-coupled when {option}" for option in spec.coupled_by]
        if spec.aggregators is not None:
            flags.append(f"aggregators: {', '.join(spec.aggregators)}")
        flags += [f"signal {s}" for s in spec.signals] + [f"head {h}" for h in spec.heads]
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
        print(f"  {name:14s} [{', '.join(flags)}]  options: {options}\n  {'':14s} {spec.paper}")
    print("\naggregators (aggregator.name; per-example losses -> the batch objective):")
    for name in AGGREGATORS:
        spec = AGGREGATORS.get(name)
        flags = ["batch-coupled" if spec.batch_coupled else "decomposable"]
        flags += ["stateful"] if spec.stateful else []
        flags += [f"signal {s}" for s in spec.signals]
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
        print(f"  {name:14s} [{', '.join(flags)}]  options: {options}\n  {'':14s} {spec.paper}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a policy from a YAML config (offline losses, or the online loop when the config has `online`)",
        usage=f"%(prog)s [-h] [{OVERWRITE_FLAG}] [CONFIG] [KEY=VALUE ...]",
        description="Train with the config's loss on its data. Writes config.yaml, metrics.jsonl, checkpoints/ "
        "and final/ (a folder transformers.AutoModelForCausalLM.from_pretrained loads) into output_dir, "
        "and resumes from the newest intact checkpoint there if one exists (checkpoints carry checksums; "
        "a damaged one is skipped). An output_dir holding a run of another config is refused unless "
        f"{OVERWRITE_FLAG} is given; a finished run of the same config is left as it is. Runs on several processes under "
        "`accelerate launch -m distalign train ...` or torchrun.",
        epilog=EPILOG_OVERRIDES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config_and_overrides", nargs=argparse.REMAINDER, metavar="[CONFIG] [KEY=VALUE ...]")
    train.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="start over in an output_dir that holds an earlier run: its files (config.yaml, metrics.jsonl, "
        "checkpoints/, final/, eval/, ...) are deleted once the new run's model and data have loaded "
        "(sets train.overwrite_output_dir=true)",
    )
    train.set_defaults(handler=cmd_train, train_parser=train)

    config = commands.add_parser("config", help="inspect configurations")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser(
        "show",
        help="print the resolved configuration",
        description="Validate CONFIG with the overrides applied and print every field, defaults included.",
        epilog=EPILOG_OVERRIDES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    show.set_defaults(handler=cmd_config_show)

    losses = commands.add_parser(
        "losses", help="list the registered losses and aggregators, their options and papers"
    )
    losses.set_defaults(handler=cmd_losses)
