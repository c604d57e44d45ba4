"""``distalign data check`` (and, later, ``data make``)."""

from __future__ import annotations

import argparse


def cmd_data_check(args: argparse.Namespace) -> int:
    from distalign.data.check import summarize_dataset

    tokenizer = None
    settings = None
    if args.model:
        from distalign.data.tokenize import TokenizationSettings
        from distalign.models.loading import load_model_and_tokenizer

        _, tokenizer = load_model_and_tokenizer(args.model)
        settings = TokenizationSettings(
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            truncation=args.truncation,
            chat_template=args.chat_template,
        )
    summary = summarize_dataset(
        args.file,
        tokenizer=tokenizer,
        settings=settings,
        format=args.format,
        split=args.split,
        limit=args.limit,
    )
    print(summary.to_text())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
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
    check.add_argument(
        "--format", default="auto", choices=["auto", "paired", "unpaired", "listwise", "prompt"]
    )
    check.add_argument("--split", default="train", help="split of a `datasets` dataset")
    check.add_argument("--limit", type=int, default=None, help="check only the first N rows")
    check.add_argument("--model", help="tokenizer to measure lengths with (tiny, smollm2, a path)")
    check.add_argument("--max-length", type=int, default=256)
    check.add_argument("--max-prompt-length", type=int, default=128)
    check.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    check.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    check.set_defaults(handler=cmd_data_check)
