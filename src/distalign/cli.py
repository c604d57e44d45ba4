"""The ``distalign`` command line.

Every user error (bad config, bad data row, impossible setting) prints one clear message and exits
with status 2, before anything is written. Heavy imports (torch, transformers) happen inside the
commands so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2

EPILOG_OVERRIDES = """\
Overrides use dotted keys and YAML values, e.g.:
  distalign train configs/quickstart.yaml loss.name=ipo loss.beta=0.5 train.max_steps=20 output_dir=runs/ipo
"""


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the config file; the rest are key=value overrides."""
    config, overrides = None, []
    for item in items:
        if config is None and not overrides and "=" not in item:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def _load(items: Sequence[str]):
    from distalign.config import load_config

    config_path, overrides = _split_config_and_overrides(items)
    return load_config(config_path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args.config_and_overrides)
    from distalign.train.offline import train_offline

    run_dir = train_offline(config)
    print(f"run saved to {run_dir} (final model: {run_dir / 'final'})")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from distalign.config import dump_config

    print(dump_config(_load(args.config_and_overrides)), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from distalign.data.check import summarize_dataset

    tokenizer = None
    settings = None
    if args.model:
        from distalign.data.tokenize import TokenizationSettings
        from distalign.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        settings = TokenizationSettings(
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            truncation=args.truncation,
            chat_template=args.chat_template,
        )
    summary = summarize_dataset(args.file, tokenizer=tokenizer, settings=settings, format=args.format)
    print(summary.to_text())
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from distalign.losses import LOSSES

    for name in LOSSES:
        spec = LOSSES.get(name)
        flags = [spec.data_kind, "reference" if spec.needs_reference else "reference-free"]
        if spec.batch_coupled:
            flags.append("batch-coupled")
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
        print(f"{name:14s} [{', '.join(flags)}]  options: {options}\n{'':14s} {spec.paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distalign",
        description="Distributional preference alignment for language models (AOT, f-DPG, UPO, DoRA, DPO family).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a policy with an offline loss from a YAML config",
        description="Train with the config's loss on its data. Writes config.yaml, metrics.jsonl, checkpoints/ "
        "and final/ (a folder transformers.AutoModelForCausalLM.from_pretrained loads) into output_dir, "
        "and resumes from the newest checkpoint there if one exists. Runs on several processes under "
        "`accelerate launch -m distalign train ...` or torchrun.",
        epilog=EPILOG_OVERRIDES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    train.set_defaults(handler=cmd_train)

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

    data = commands.add_parser("data", help="check or make datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser(
        "check",
        help="validate a dataset and summarise it",
        description="Validate every row of FILE (JSONL, CSV, Parquet, a saved `datasets` directory, or "
        "builtin:NAME) and print rows, format, sources and, with --model, token-length percentiles and "
        "what truncation would do. A malformed row is reported with file, row, field and reason (exit 2).",
    )
    check.add_argument("file")
    check.add_argument("--format", default="auto", choices=["auto", "paired", "unpaired", "listwise", "prompt"])
    check.add_argument("--model", help="tokenizer to measure lengths with (tiny, smollm2, a path)")
    check.add_argument("--max-length", type=int, default=256)
    check.add_argument("--max-prompt-length", type=int, default=128)
    check.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    check.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    check.set_defaults(handler=cmd_data_check)

    losses = commands.add_parser("losses", help="list the registered losses, their options and papers")
    losses.set_defaults(handler=cmd_losses)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from distalign.config import ConfigError
    from distalign.data.formats import DataError
    from distalign.registry import UnknownNameError
    from distalign.train.setup import SetupError

    return (ConfigError, DataError, SetupError, UnknownNameError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Exception as err:  # user errors become one line and exit 2; bugs keep their traceback
        if isinstance(err, _user_errors()):
            print(f"distalign: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
