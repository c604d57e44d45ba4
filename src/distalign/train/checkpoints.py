"""Checkpoint integrity and the rules for re-running ``train`` into an existing run directory.

**Checksums.** Every checkpoint holds ``checksums.json``: the sha256 and size of every other file in it
(weights, optimizer, RNG, scheduler, ``loop_state.json``, ...), written last, inside the temporary
directory, before the atomic rename. Before resuming, :func:`plan_run_dir` checks the newest checkpoint:
a file that is missing, has another size, has other bytes, or a ``loop_state.json`` / manifest that is
not readable JSON makes the checkpoint *damaged*; the newest intact one is used instead (the engine
says which and why, and moves the damaged ones aside as ``checkpoints/damaged_step_N``). When none is
intact, ``train`` stops with a :class:`~distalign.errors.SetupError` before anything is loaded.

**Legacy checkpoints** (no ``checksums.json``: written before distalign checked them) are accepted with
a warning as long as their ``loop_state.json`` is readable; they are loaded unverified. Any error while
loading a checkpoint (legacy or verified: e.g. one written by another version of a dependency) becomes
a ``SetupError`` naming the checkpoint.

**Config fingerprint.** A run directory's ``config.yaml`` is the config its checkpoints were trained
with. ``train`` into a directory that holds an earlier run compares it with the new config, ignoring
:data:`RESULT_NEUTRAL_FIELDS`, and refuses on any difference (naming the fields, old -> new) — unless ``train.overwrite_output_dir`` is
set, in which case the earlier run's files (:data:`RUN_FILES`, nothing else) are deleted once the new
run's inputs have loaded and validated (:func:`remove_run_files`, called by ``Engine.open_run_dir``).

**Finished runs.** A run directory with ``final/`` and the same config is a finished run: training
again would reproduce it, so ``train`` does nothing (:class:`RunFinished`; the CLI says so and exits 0,
which also makes a retry after a crash at the very end succeed). ``--overwrite-output-dir`` trains it
again from step 0.

**Stale evaluations.** ``eval/`` measures one saved model: training deletes it before it saves a new
``final/`` (:func:`remove_stale_evaluation`, which says why it is deleted rather than set aside).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from distalign.config import RunConfig
from distalign.config.base import resume_neutral_fields
from distalign.config.run import move_renamed_settings
from distalign.errors import SetupError

CHECKPOINT_PREFIX = "step_"
DAMAGED_PREFIX = "damaged_"
MANIFEST = "checksums.json"
LOOP_STATE = "loop_state.json"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")

#: What a run writes into its ``output_dir``; ``train.overwrite_output_dir`` deletes these and only these,
#: config.yaml last (a start-over killed half-way leaves files that are still checked against their config).
RUN_FILES = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "evals.jsonl",
    "dominance.json",
    "plots",
    "eval",
    "logs",
    "config.yaml",
)
#: Their presence means the directory holds an earlier run (``eval/``, ``plots/``, ``logs/`` alone do not).
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")

#: Config fields (dotted prefixes) that may differ between a run's checkpoints and the run resuming
#: them: those marked on the fields themselves (``distalign.config.base.RESUME_NEUTRAL``). A run resumed
#: with a memory-for-compute knob changed trains the same objective but is not bitwise equal to the
#: uninterrupted run. Everything else (model, data, loss and its options, aggregator, reference model,
#: seed, lr, schedule, batch_size, max_steps / epochs, mixed precision, the online section, ...)
#: changes the result and must match.
RESULT_NEUTRAL_FIELDS = resume_neutral_fields(RunConfig)

_WAYS_OUT = (
    "choose a new output_dir, or pass --overwrite-output-dir (config: train.overwrite_output_dir=true) to "
    "delete that run's files and start over"
)


# ------------------------------------------------------------------------------------ checksums
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Write ``directory/checksums.json``: sha256 and size of every other file below ``directory``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(directory).as_posix(): {"sha256": sha256_of(p), "size": p.stat().st_size} for p in files
    }
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1) + "\n")


@dataclass(frozen=True)
class CheckpointCheck:
    """The verdict on one checkpoint: "intact", "legacy" (no manifest, loadable as far as is known) or
    "damaged" (``problem`` says which file and why)."""

    path: Path
    status: str
    problem: str | None = None


def read_loop_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``loop_state.json``: a JSON object with an integer ``step`` (ValueError otherwise)."""
    state = json.loads((path / LOOP_STATE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("not an object with an integer 'step'")
    return state


def _loop_state_problem(path: Path) -> str | None:
    if not (path / LOOP_STATE).is_file():
        return f"{LOOP_STATE} is missing"
    try:
        read_loop_state(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{LOOP_STATE} is unreadable ({err})"
    return None


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    manifest = json.loads((path / MANIFEST).read_text())
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ValueError("'files' is not an object")
    for name, entry in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"it lists a path outside the checkpoint: {name!r}")
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise ValueError(f"the entry of {name!r} has no sha256 / size")
    return files


def inspect_checkpoint(path: Path) -> CheckpointCheck:
    """Check a checkpoint against its ``checksums.json`` (every file present, same size, same sha256)."""
    if not (path / MANIFEST).is_file():
        problem = _loop_state_problem(path)
        if problem:
            return CheckpointCheck(path, "damaged", f"{problem}, and it has no {MANIFEST}")
        return CheckpointCheck(path, "legacy")
    try:
        files = _read_manifest(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return CheckpointCheck(path, "damaged", f"{MANIFEST} is unreadable ({type(err).__name__}: {err})")
    problems = [] if LOOP_STATE in files else [f"{MANIFEST} does not list {LOOP_STATE}"]
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            size = file.stat().st_size
            if size != entry["size"]:
                problems.append(
                    f"{name} has {size} bytes, {entry['size']} were written (truncated or replaced)"
                )
            elif sha256_of(file) != entry["sha256"]:
                problems.append(f"{name}: sha256 checksum mismatch (its bytes changed after it was written)")
        except OSError as err:
            problems.append(f"{name} cannot be read ({err})")
    if not problems and (problem := _loop_state_problem(path)):
        problems.append(problem)
    if problems:
        return CheckpointCheck(path, "damaged", "; ".join(problems))
    return CheckpointCheck(path, "intact")


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Every ``step_N`` directory, oldest first (temporary, old and damaged directories are not listed)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def move_aside(path: Path, prefix: str) -> Path:
    """Rename ``path`` to ``prefix + name`` beside it (replacing an earlier one) and return the new path."""
    target = path.with_name(prefix + path.name)
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target


# ------------------------------------------------------------------------------ config fingerprint
_UNSET = object()


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # X | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def schema_default(path: str) -> Any:
    """The default of the config field at a dotted ``path`` (as JSON values), or ``_UNSET``."""
    cls: type[BaseModel] | None = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        info = cls.model_fields.get(part) if cls is not None else None
        if info is None:
            return _UNSET
        if i == len(parts) - 1:
            if info.is_required():
                return _UNSET
            value = info.get_default(call_default_factory=True)
            return (
                value.model_dump(mode="json") if isinstance(value, BaseModel) else to_jsonable_python(value)
            )
        cls = _model_class(info.annotation)
    return _UNSET


def _is_neutral(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in RESULT_NEUTRAL_FIELDS)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"path: old -> new"`` for every field that differs between two resolved config trees and can
    change the trained result. A field missing from ``old`` (added to distalign after it was written) is
    equal when ``new`` holds its default."""
    differences: list[str] = []
    for key in [*new, *(k for k in old if k not in new)]:
        path = f"{prefix}{key}"
        if _is_neutral(path):
            continue
        if key not in old:
            if new[key] != schema_default(path):
                differences.append(f"{path}: (not set) -> {_show(new[key])}")
        elif key not in new:
            differences.append(f"{path}: {_show(old[key])} -> (not set)")
        elif isinstance(old[key], dict) and isinstance(new[key], dict):
            differences += config_differences(old[key], new[key], f"{path}.")
        elif old[key] != new[key]:
            differences.append(f"{path}: {_show(old[key])} -> {_show(new[key])}")
    return differences


# ------------------------------------------------------------------------------------ the run dir
class RunFinished(SetupError):
    """``output_dir`` already holds the finished run of this config: there is nothing to train."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


@dataclass
class RunDirPlan:
    """What ``train`` does with its ``output_dir``, decided before the model and data load.

    ``error``: refuse (message for a SetupError). ``clear``: delete the earlier run's files when the
    run directory is opened. ``resume``: the checkpoint to load (``legacy``: without a manifest), and
    ``damaged``: (checkpoint, problem) of the newer ones passed over. ``finished``: the directory holds
    the finished run of this config (``error`` says so)."""

    error: str | None = None
    finished: bool = False
    clear: bool = False
    resume: Path | None = None
    legacy: bool = False
    damaged: list[tuple[Path, str]] = field(default_factory=list)


def existing_run_files(run_dir: Path) -> list[str]:
    """The files of an earlier run in ``run_dir`` (names from :data:`RUN_FILES`)."""
    if not any((run_dir / name).exists() for name in _RUN_MARKERS):
        return []
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def plan_run_dir(config: RunConfig) -> RunDirPlan:
    """Decide, from what ``output_dir`` holds, whether this config may start or resume there."""
    run_dir = Path(config.output_dir)
    found = existing_run_files(run_dir)
    if not found:
        return RunDirPlan()
    if config.train.overwrite_output_dir:
        return RunDirPlan(clear=True)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return RunDirPlan(
            error=f"output_dir {run_dir} holds files of an earlier run ({', '.join(found)}) but no "
            f"config.yaml, so they cannot be checked against this config; {_WAYS_OUT}"
        )
    try:
        old = yaml.safe_load(saved.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
        old = move_renamed_settings(old, warn=False)  # written before a setting moved: compare it there
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return RunDirPlan(
            error=f"{saved} (the config of the run in output_dir) is unreadable ({reason}); {_WAYS_OUT}"
        )
    differences = config_differences(old, config.model_dump(mode="json"))
    if differences:
        return RunDirPlan(
            error=f"output_dir {run_dir} holds a run trained with a different config ({saved}): "
            f"{'; '.join(differences)}. Continuing it would mix two trainings; {_WAYS_OUT}"
        )
    if (run_dir / "final").exists():
        return RunDirPlan(
            finished=True,
            error=f"output_dir {run_dir} already holds the finished run of this config (final model: "
            f"{run_dir / 'final'}); nothing to train. To train it again from step 0, pass --overwrite-output-dir "
            "(config: train.overwrite_output_dir=true), which deletes that run's files, or choose a new output_dir",
        )
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        check = inspect_checkpoint(path)
        if check.status != "damaged":
            return RunDirPlan(resume=path, legacy=check.status == "legacy", damaged=damaged)
        damaged.append((path, check.problem or "damaged"))
    if damaged:
        listed = "; ".join(f"{path} is damaged: {problem}" for path, problem in damaged)
        return RunDirPlan(
            error=f"no intact checkpoint to resume from in {run_dir / 'checkpoints'} ({listed}). Nothing was "
            f"loaded or changed. To start this run over, delete {run_dir / 'checkpoints'} or pass "
            "--overwrite-output-dir (config: train.overwrite_output_dir=true); or choose a new output_dir"
        )
    return RunDirPlan()  # the earlier attempt stopped before its first checkpoint: start again from step 0


def remove_run_files(run_dir: Path) -> list[str]:
    """Delete an earlier run's files from ``run_dir`` (:data:`RUN_FILES`, and the staging directories of
    an interrupted save of ``final/``); anything else there is left alone. Returns the names removed."""
    removed = [name for name in RUN_FILES if _delete(run_dir / name)]
    for staging in run_dir.glob(".final.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)
    return removed


def remove_stale_evaluation(run_dir: Path) -> bool:
    """Delete ``run_dir/eval`` (``distalign eval``'s results) before a new ``final/`` is saved there;
    returns whether there was one.

    An evaluation measures one saved model. When training saves a new ``final/``, the model the
    evaluation measured is being replaced, so its numbers would sit next to a model they were not
    measured on, and ``distalign report`` and the model card would show them as current. A re-run with
    ``--overwrite-output-dir`` deletes ``eval/`` with the earlier run's other files
    (:func:`remove_run_files`); this catches the other ways in: a run resumed after its ``final/`` was
    deleted, or a directory holding an ``eval/`` but no run files.

    Removed, not moved to ``eval.stale/`` with a note: every reader (report, sweep, model card, demo)
    would have to learn the marker, and one that did not would again show old numbers as current;
    the model they describe is gone, and ``distalign eval RUN`` measures the new one. It is deleted
    before the new model is published, so an interruption in between leaves no evaluation, never a
    wrong one.
    """
    return _delete(run_dir / "eval")


def _delete(path: Path) -> bool:
    """Delete a file, link or directory tree; returns whether there was anything to delete."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True
