"""``distalign data check`` and ``distalign data make``."""

from __future__ import annotations

import argparse


def _check_length_flags(args: argparse.Namespace) -> None:
    """The length flags, refused before anything is loaded (exit 2 naming the flag)."""
    from distalign.config import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1 (leave it out to check every row)")
    if args.max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length {args.max_prompt_length}: must be at least 1")
    if args.max_length < 2:
        raise ConfigError(
            f"--max-length {args.max_length}: must be at least 2 (a prompt and a completion token)"
        )
    if args.max_prompt_length >= args.max_length:
        raise ConfigError(
            f"--max-prompt-length {args.max_prompt_length} must be smaller than --max-length {args.max_length}, "
            "so that every completion keeps at least one token"
        )


def cmd_data_check(args: argparse.Namespace) -> int:
    from distalign.data.check import summarize_dataset

    _check_length_flags(args)
    tokenizer = None
    settings = None
    if args.model:
        from distalign.data.tokenized import TokenizationSettings
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
        subset=args.subset,
        limit=args.limit,
    )
    print(summary.to_text())
    return 0


def _task_settings(items: list[str]) -> dict:
    from distalign.config import ConfigError, parse_overrides

    for item in items:
        if "." in item.partition("=")[0]:
            raise ConfigError(f"--task-setting {item!r}: expected NAME=VALUE with a plain name")
    return parse_overrides(items)


def cmd_data_make(args: argparse.Namespace) -> int:
    from distalign.tasks.io import provenance_path
    from distalign.tasks.make import default_output_path
    from distalign.tasks.sampler import make_task_dataset

    path = make_task_dataset(
        args.task,
        args.output or default_output_path(args.task, args.kind),
        model_name=args.model,
        kind=args.kind,
        k=args.k,
        num_prompts=args.num_prompts,
        seed=args.seed,
        bt_noise=args.bt_noise,
        label_noise=args.label_noise,
        source_set=args.sources,
        split=args.split,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        task_settings=_task_settings(args.task_setting),
    )
    print(f"wrote {path} (provenance: {provenance_path(path)})")
    return 0


def _register_make(data_commands: argparse._SubParsersAction) -> None:
    make = data_commands.add_parser(
        "make",
        help="build a dataset from a built-in task by sampling a base model",
        description="Sample K completions per prompt of TASK (sentiment, readability, keyword) from the base "
        "model, score them with the task's gold reward and write rows as JSONL: best-vs-worst pairs "
        "(paired), their unpaired split, every scored sample (listwise) or the prompts alone (prompt). "
        "A sidecar FILE.provenance.json records the model, seed, sampling settings, gold reward and counts. "
        "The same seed and settings give the same file.",
    )
    make.add_argument("task", help="built-in task: sentiment, readability or keyword")
    make.add_argument("--model", default="smollm2", help="base model to sample (tiny, smollm2, a path)")
    make.add_argument(
        "--kind",
        default="paired",
        choices=["paired", "unpaired", "listwise", "prompt", "shift"],
        help="row format; 'shift' = pairs from a mixture of response sources (golden + synthetic, docs/robust.md)",
    )
    make.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="--kind shift: fraction of pairs whose labels are flipped at random (default 0)",
    )
    make.add_argument(
        "--sources",
        default="default",
        choices=["default", "wide"],
        help="--kind shift: the response sources (default: golden, hot, hype, terse; wide: golden, hot, cold, "
        "pirate, which a classifier can tell apart; docs/robust.md)",
    )
    make.add_argument("--k", type=int, default=4, help="completions sampled per prompt")
    make.add_argument(
        "--num-prompts", type=int, default=None, help="prompts to use (default: all of the split)"
    )
    make.add_argument(
        "--seed", type=int, default=0, help="seeds the prompt choice, the samples and the noise"
    )
    make.add_argument(
        "--output",
        help="JSONL file to write (default: runs/data/TASK_KIND.jsonl under the current directory: generated "
        "data is an output like the runs that train on it, kept under runs/ with them rather than loose in "
        "the working directory)",
    )
    make.add_argument(
        "--bt-noise",
        type=float,
        default=None,
        help="Bradley-Terry temperature: flip a pair with probability sigmoid(-gap / T) (default: no noise)",
    )
    make.add_argument("--split", default="train", choices=["train", "heldout"])
    make.add_argument("--max-new-tokens", type=int, default=48)
    make.add_argument("--batch-size", type=int, default=16, help="sequences per sampling forward pass")
    make.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="sample with the chat template and write conversational rows (auto: iff the model has one)",
    )
    make.add_argument(
        "--task-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a task factory setting, e.g. objective=grade for readability, pool=large for sentiment "
        "(repeatable)",
    )
    make.set_defaults(handler=cmd_data_make)


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check or make datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser(
        "check",
        help="validate a dataset and summarise it",
        description="Validate every row of FILE (JSONL, JSON, CSV, TSV, Parquet, a `datasets` directory, a "
        "hub dataset id, or builtin:NAME) and print rows, format, sources and, with --model, token-length "
        "percentiles and what truncation would do. A malformed row is reported with file, row, field and "
        "reason (exit 2); problems that do not stop training are printed as warnings.",
    )
    check.add_argument("file")
    check.add_argument(
        "--format", default="auto", choices=["auto", "paired", "unpaired", "listwise", "prompt"]
    )
    check.add_argument("--split", default="train", help="split of a `datasets` dataset")
    check.add_argument("--subset", default=None, help="subset (configuration name) of a hub dataset")
    check.add_argument("--limit", type=int, default=None, help="check only the first N rows")
    check.add_argument("--model", help="tokenizer to measure lengths with (tiny, smollm2, a path)")
    check.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens at most")
    check.add_argument(
        "--max-prompt-length", type=int, default=128, help="prompt tokens at most (below --max-length)"
    )
    check.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    check.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    check.set_defaults(handler=cmd_data_check)
    _register_make(data_commands)
