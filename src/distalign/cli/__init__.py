"""The ``distalign`` command line.

Each command group lives in its own module exposing ``register(commands)``; this module builds the
parser and decides how a command ends:

* success: the handler's exit status (0);
* a user error (a bad config, data file, setting or path; a run that cannot learn as configured; an
  OS error such as a missing file, permission denied or a full disk): one line ``distalign: error:
  ...`` naming what and where, exit status 2, no traceback;
* Ctrl-C: ``distalign: interrupted``, exit status 130;
* anything else is a bug: its traceback, then a line asking to report it, exit status 1.

``distalign --debug COMMAND ...`` (or ``DISTALIGN_DEBUG=1``) also prints the traceback of a user error.
Heavy imports (torch, transformers) happen inside the command handlers so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from distalign.cli import data, evaluate, shift, sweep, train

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
COMMAND_MODULES = (train, data, evaluate, shift, sweep)
DEBUG_ENV = "DISTALIGN_DEBUG"
REPORT_LINE = (
    "distalign: internal error — please report it with the command and this traceback "
    "(distalign {version}; `distalign --debug ...` shows user errors' tracebacks too)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distalign",
        description="Distributional preference alignment for language models (AOT, f-DPG, the DPO family, robust aggregators).",
        epilog=f"Errors: a user error prints one line and exits with status 2; --debug (or {DEBUG_ENV}=1) "
        "adds its traceback. Any other failure is a bug: its traceback and exit status 1.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of user errors too (same as {DEBUG_ENV}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from distalign.config import ConfigError
    from distalign.data.formats import DataError
    from distalign.errors import SetupError
    from distalign.models.gguf import EmbeddedModelUnavailableError
    from distalign.models.loading import ModelLoadError
    from distalign.registry import UnknownNameError
    from distalign.train.engine import TrackerUnavailableError

    return (
        ConfigError,
        DataError,
        SetupError,  # includes TrainingStoppedError: a run that cannot learn as configured
        UnknownNameError,
        ModelLoadError,
        EmbeddedModelUnavailableError,
        TrackerUnavailableError,
        OSError,  # missing file, permission denied, disk full: the environment, not a bug
        UnicodeDecodeError,  # a binary file given as a config or data file
        *_out_of_memory_errors(),
    )


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """Running out of (GPU) memory is a setting to change, not a bug; torch only if already imported."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (MemoryError,) + ((oom,) if isinstance(oom, type) else ())


def prefer_passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose a policy.

    Must run before torch is imported. On a machine shared with other jobs, the spinning threads of
    several processes starve each other: sampling SmolLM2 on 2 busy cores measured 6x slower with the
    default (active) policy than with the passive one.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` on the command line, or ``DISTALIGN_DEBUG`` set to anything but 0/false/no/empty."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _file_being_handled(err: BaseException) -> str | None:
    """The innermost ``path`` / open file in the failing frames (for errors that do not carry a filename,
    e.g. a decoding error or a write that fills the disk)."""
    tb, found = err.__traceback__, None
    while tb is not None:
        for name, value in tb.tb_frame.f_locals.items():
            if name in ("path", "filename", "file") and isinstance(value, (str, os.PathLike)):
                found = str(value)
            elif isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                found = value.name
        tb = tb.tb_next
    return found


def _output_location(args: argparse.Namespace) -> str | None:
    """The path the command writes to, when the command line (or its config) names it."""
    command = getattr(args, "command", None)
    if command == "train":
        from distalign.cli.common import load_run_config

        try:
            return str(load_run_config(args.config_and_overrides).output_dir)
        except Exception:  # the config itself failed: nothing was being written
            return None
    if command == "data" and getattr(args, "data_command", None) == "make":
        return args.output or f"{args.task}_{args.kind}.jsonl"
    if command == "demo":
        return args.output_dir or ("runs/demo_tiny" if args.tiny else "runs/demo")
    if command in ("eval", "report"):
        return args.output
    if command == "sweep":
        return getattr(args, "output_dir", None)
    return None


def _writes_into(filename: str, output: str) -> bool:
    """``filename`` is the output, inside it, one of the directories above it (being created), or a
    sibling (the temporary file of an atomic write)."""
    file, out = Path(filename).absolute(), Path(output).absolute()
    return file == out or out in file.parents or file in out.parents or file.parent == out.parent


def describe_user_error(err: BaseException, args: argparse.Namespace) -> str:
    """The one line (after ``distalign: error:``) for a user error: what failed, and where."""
    if isinstance(err, UnicodeDecodeError):
        where = _file_being_handled(err)
        return f"{where or 'an input file'}: not UTF-8 text ({err.reason} at byte {err.start})"
    if isinstance(err, _out_of_memory_errors()):
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return (
            f"out of memory ({first_line}): lower train.micro_batch_size (online: also "
            "online.sampling_batch_size), shorten data.max_length / online.max_new_tokens, or train LoRA "
            "adapters (model.lora.enabled=true)"
        )
    if not isinstance(err, OSError):
        return str(err)
    reason = err.strerror or str(err) or type(err).__name__
    output = _output_location(args)
    if err.filename is None:  # e.g. a write that filled the disk: name the file being written, or the output
        where = _file_being_handled(err) or output
        return f"{reason} (writing {where})" if where and err.strerror else reason
    where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    if output is not None and _writes_into(str(err.filename), output):
        return f"cannot write {output}: {reason}" + ("" if where == output else f" ({where})")
    return f"{where}: {reason}"


def _interrupted_line(args: argparse.Namespace) -> str:
    if getattr(args, "command", None) == "train":
        return (
            "distalign: interrupted; `distalign train` with the same config resumes from the newest "
            "checkpoint in its output_dir (train.save_every > 0 writes them)"
        )
    if getattr(args, "command", None) == "sweep":
        return (
            "distalign: interrupted; the same `distalign sweep` command continues where it stopped "
            "(finished runs are skipped; a run resumes from its newest checkpoint, train.save_every > 0)"
        )
    return "distalign: interrupted"


def main(argv: Sequence[str] | None = None) -> int:
    prefer_passive_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        if debug_requested(args):
            traceback.print_exc()
        print(_interrupted_line(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # user errors become one line and exit 2; bugs keep their traceback
        if isinstance(err, _user_errors()):
            if debug_requested(args):
                traceback.print_exc()
            print(f"distalign: error: {describe_user_error(err, args)}", file=sys.stderr)
            return EXIT_USAGE
        from distalign import __version__

        traceback.print_exc()
        print(REPORT_LINE.format(version=__version__), file=sys.stderr)
        return EXIT_INTERNAL


def run() -> None:
    """The ``distalign`` command: :func:`main`, then the end of the process (without interpreter
    finalisation after a multi-process run: :func:`distalign.train.distributed.exit_process`)."""
    from distalign.train.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
