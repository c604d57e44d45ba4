"""Running a sweep: train each run, evaluate it, collect ``sweep.json`` and one HTML report.

For each selected run, in order: train it (``distalign.train.run_training``: a run directory with
checkpoints resumes from the newest, a finished one — ``final/`` present, same config — is left as it
is), then evaluate it into ``RUN/eval/``. A run is skipped when training is finished and its
``eval/eval.json`` is newer than ``final/`` and was made with the same eval settings and reference
(recorded in the eval's ``settings["sweep_eval"]``), so a killed sweep rerun continues where it
stopped and a finished one redoes nothing.

The reference's samples depend only on the reference model, the prompts and the eval settings, so they
are drawn once per distinct (reference, eval settings) and shared by every run that has them
(:class:`ReferencePool`), as ``distalign demo`` does: all runs of a sweep are compared with the same
reference draws, and their reference numbers are equal.

A run that fails with a user error (bad data, a run that cannot learn, a model that does not load) is
recorded as failed and the sweep goes on with the next; anything else stops the sweep.
``OUTPUT_DIR/sweep.json`` is rewritten after every run, so it is current even after an interruption.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distalign.config import RunConfig
from distalign.errors import SetupError
from distalign.eval.pareto import COMPOSITE
from distalign.stats.metrics import Estimate, EvalResult
from distalign.sweep import Sweep, SweepRun

#: Key of ``EvalResult.settings`` recording what a sweep evaluated with (to know when to redo it).
SWEEP_EVAL_KEY = "sweep_eval"
SWEEP_JSON = "sweep.json"
REPORT = "report.html"


@dataclass
class RunRecord:
    """What a sweep knows about one run: its state on disk, what this invocation did, and its numbers."""

    name: str
    group: str
    overrides: list[str]
    path: str
    status: str = "pending"
    """"done" (trained and evaluated), "trained" (not evaluated), "partial" (checkpoints, no final
    model), "pending" (nothing yet) or "failed" (this invocation: see ``error``)."""
    actions: list[str] = field(default_factory=list)
    """What this invocation did: "trained", "resumed from step_N", "evaluated", "up to date", ..."""
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    """From eval.json: win_rate, gold_reward, kl (k1, nats), designer and designer_difference (the
    composite designer score of the policy, and policy minus reference), each value/low/high/n."""


def eval_fingerprint(config: RunConfig) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides the policy: the reference and the eval settings."""
    return {
        "reference": config.reference.model or config.model.name,
        "eval": config.eval.model_dump(mode="json"),
    }


#: Files of final/ rewritten by an evaluation (the model cards, final/README.md and, for LoRA,
#: final/adapter/README.md, show its numbers), not by training.
_EVAL_WRITTEN = ("README.md", "adapter/README.md")


def _newest_mtime(path: Path) -> int:
    stamps = [
        p.stat().st_mtime_ns
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).as_posix() not in _EVAL_WRITTEN
    ]
    return max(stamps, default=path.stat().st_mtime_ns)


def is_trained(run_dir: Path) -> bool:
    """``final/`` holds a saved model or LoRA adapter (written atomically at the end of training)."""
    from distalign.models.saved import saved_model_layout

    return saved_model_layout(run_dir / "final") is not None


def eval_is_current(run_dir: Path, config: RunConfig) -> bool:
    """``RUN/eval/eval.json`` is newer than every file of ``final/`` and was made by a sweep with the
    same reference and eval settings as ``config``'s (an evaluation by hand, with settings unknown to
    the sweep, is redone)."""
    eval_json = run_dir / "eval" / "eval.json"
    if not is_trained(run_dir) or not eval_json.is_file():
        return False
    if eval_json.stat().st_mtime_ns <= _newest_mtime(run_dir / "final"):
        return False
    try:
        settings = json.loads(eval_json.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return False
    return settings.get(SWEEP_EVAL_KEY) == eval_fingerprint(config)


def planned_action(run: SweepRun, *, evaluate: bool = True) -> str:
    """What running ``run`` would do now, decided from its directory alone (loads nothing). Starts with
    "refused:" when training would refuse the directory (it holds a run of another config, ...)."""
    from distalign.train.checkpoints import plan_run_dir

    plan = plan_run_dir(run.config)
    if plan.error and not plan.finished:
        return f"refused: {plan.error}"
    if plan.finished:
        train = "trained"
    elif plan.resume is not None:
        train = f"resume from {plan.resume.name}"
    else:
        train = "train"
    if not evaluate:
        return train
    if plan.finished and eval_is_current(run.path, run.config):
        return "up to date"
    return f"{train}, evaluate"


@dataclass
class SharedReference:
    """A reference model with the prompts and samples of one eval setting, shared by several runs."""

    name: str
    model: Any
    tokenizer: Any
    plan: Any
    samples: Any


class ReferencePool:
    """Reference samples drawn once per (reference model, eval settings); one reference model is kept
    loaded at a time (it also scores every policy's samples for the KL estimate)."""

    def __init__(self) -> None:
        self._model_key: str | None = None
        self._model: tuple[Any, Any] | None = None
        self._drawn: dict[str, tuple[Any, Any]] = {}

    def get(self, config: RunConfig) -> SharedReference:
        from distalign.eval.run import draw_reference_samples, eval_prompts, load_eval_model

        name = config.reference.model or config.model.name
        model_key = json.dumps(
            [name, config.model.dtype, config.model.revision, config.model.trust_remote_code]
        )
        if model_key != self._model_key:
            self._model, self._model_key = None, None
            gc.collect()
            self._model, self._model_key = load_eval_model(name, config), model_key
        assert self._model is not None
        model, tokenizer = self._model
        key = json.dumps([model_key, config.eval.model_dump(mode="json")], sort_keys=True)
        if key not in self._drawn:
            plan = eval_prompts(config.eval, tokenizer)
            self._drawn[key] = (plan, draw_reference_samples(model, tokenizer, plan, config.eval))
        plan, samples = self._drawn[key]
        return SharedReference(name, model, tokenizer, plan, samples)


def _same_tokenizer(a: Any, b: Any) -> bool:
    """Equal vocabularies and chat templates: the shared prompts render, and the policy's token ids
    score under the reference, as they would with the policy's own tokenizer."""
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(
        b, "chat_template", None
    )


def evaluate_sweep_run(run: SweepRun, pool: ReferencePool) -> Path:
    """Evaluate ``RUN/final`` against the shared reference samples; writes ``RUN/eval/``, returns eval.json."""
    from distalign.eval.outcome import write_eval
    from distalign.eval.run import evaluate_models, load_trained_model, run_designer
    from distalign.train.card import refresh_model_card

    config, final = run.config, run.path / "final"
    reference = pool.get(config)
    policy, tokenizer = load_trained_model(final, config)
    if not _same_tokenizer(tokenizer, reference.tokenizer):
        raise SetupError(
            f"run {run.name}: its tokenizer differs from the reference {reference.name!r}'s (vocabulary or "
            "chat template); evaluate it alone with `distalign eval`"
        )
    outcome = evaluate_models(
        policy,
        reference.model,
        reference.tokenizer,
        config.eval,
        reference_samples=reference.samples,
        plan=reference.plan,
        settings={
            "policy": str(final),
            "reference": reference.name,
            SWEEP_EVAL_KEY: eval_fingerprint(config),
        },
        designer=run_designer(config, run.path),  # RUN/designer.json: the scale training normalised with
    )
    del policy
    written = write_eval(outcome, run.path / "eval", save_samples=config.eval.save_samples)
    refresh_model_card(run.path, outcome.result)  # final/README.md shows the sweep's evaluation
    return written


def train_sweep_run(run: SweepRun) -> str | None:
    """Train ``run`` unless it is finished; returns what was done ("trained", "resumed from step_N"),
    or ``None`` when there was nothing to train."""
    from distalign.train import run_training
    from distalign.train.checkpoints import plan_run_dir

    plan = plan_run_dir(run.config)
    if plan.finished:
        return None
    if plan.error:  # training would refuse the same way, after loading the model and data
        raise SetupError(plan.error)
    action = f"resumed from {plan.resume.name}" if plan.resume is not None else "trained"
    run_training(run.config)
    return action


def _estimate(value: Estimate | None) -> dict[str, Any] | None:
    return None if value is None else asdict(value)


def eval_summary(run_dir: Path) -> dict[str, Any]:
    """The headline numbers of ``RUN/eval/eval.json`` (empty when there is none or it is unreadable)."""
    try:
        result = EvalResult.load(run_dir / "eval" / "eval.json")
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    designer = result.designer.get(COMPOSITE, {})
    return {
        "win_rate": _estimate(result.win_rate),
        "gold_reward": _estimate(result.gold_reward.get("policy")),
        "kl": None if result.kl is None else result.kl.k1.value,
        "designer": _estimate(designer.get("policy")),
        "designer_difference": _estimate(designer.get("difference")),
    }


def disk_status(run: SweepRun) -> str:
    """ "done", "trained", "partial" or "pending", from what the run directory holds."""
    if is_trained(run.path):
        return "done" if eval_is_current(run.path, run.config) else "trained"
    if (run.path / "checkpoints").is_dir() and any((run.path / "checkpoints").iterdir()):
        return "partial"
    return "pending"


def run_errors() -> tuple[type[BaseException], ...]:
    """Errors that fail one run and let the sweep go on with the next (see the module docstring)."""
    from distalign.config import ConfigError
    from distalign.data.formats import DataError
    from distalign.models.loading import ModelLoadError
    from distalign.registry import UnknownNameError

    return (ConfigError, DataError, SetupError, ModelLoadError, UnknownNameError, MemoryError)


def _run_one(run: SweepRun, record: RunRecord, pool: ReferencePool, evaluate: bool) -> None:
    trained = train_sweep_run(run)
    record.actions.append(trained or "already trained")
    if not evaluate:
        return
    if trained is None and eval_is_current(run.path, run.config):
        record.actions = ["up to date"]
        return
    evaluate_sweep_run(run, pool)
    record.actions.append("evaluated")


def write_sweep_json(sweep: Sweep, records: Sequence[RunRecord]) -> Path:
    """Write ``OUTPUT_DIR/sweep.json`` atomically (a temporary file renamed over the old one)."""
    path = sweep.output_dir / SWEEP_JSON
    data = {
        "source": str(sweep.source),
        "base": None if sweep.base is None else str(sweep.base),
        "output_dir": str(sweep.output_dir),
        "overrides": list(sweep.overrides),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [asdict(record) for record in records],
    }
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{SWEEP_JSON}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    staging.replace(path)
    return path


def _refresh(record: RunRecord, run: SweepRun) -> RunRecord:
    if record.error is None:
        record.status = disk_status(run)
    record.summary = eval_summary(run.path)
    return record


def run_sweep(
    sweep: Sweep,
    runs: Sequence[SweepRun],
    *,
    evaluate: bool = True,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunRecord]:
    """Train and evaluate ``runs`` (a selection of ``sweep.runs``, in order), then write sweep.json (all
    the sweep's runs) and the report of every run that has a directory. Returns the records."""
    from distalign.train import check_output_dir

    check_output_dir(sweep.output_dir)
    records = {
        run.name: RunRecord(run.name, run.group, list(run.overrides), str(run.path)) for run in sweep.runs
    }
    pool = ReferencePool()
    try:
        for number, run in enumerate(runs, start=1):
            record = records[run.name]
            try:
                _run_one(run, record, pool, evaluate)
            except run_errors() as err:
                record.status, record.error = "failed", str(err)
            _refresh(record, run)
            log(f"[{number}/{len(runs)}] {status_line(record)}")
            write_sweep_json(sweep, [_refresh(records[r.name], r) for r in sweep.runs])
            gc.collect()
    finally:
        write_sweep_json(sweep, [_refresh(records[r.name], r) for r in sweep.runs])
    if report:
        write_sweep_report(sweep)
    return [records[run.name] for run in sweep.runs]


def write_sweep_report(sweep: Sweep) -> Path | None:
    """``OUTPUT_DIR/report.html`` over every run that has a run directory, unless it is newer than all
    they hold (then nothing changed since it was written); ``None`` when no run has a directory yet."""
    from distalign.eval.report import write_report

    run_dirs = [run.path for run in sweep.runs if (run.path / "config.yaml").is_file()]
    if not run_dirs:
        return None
    page = sweep.output_dir / REPORT
    inputs = [d / name for d in run_dirs for name in ("config.yaml", "metrics.jsonl", "eval/eval.json")]
    newest = max((p.stat().st_mtime_ns for p in inputs if p.is_file()), default=0)
    if page.is_file() and page.stat().st_mtime_ns > newest:
        return page
    return write_report(run_dirs, page)


def _show(estimate: dict[str, Any] | None) -> str:
    if not estimate:
        return "-"
    return f"{estimate['value']:.3g} [{estimate['low']:.3g}, {estimate['high']:.3g}]"


def status_line(record: RunRecord) -> str:
    """One line: the run, what was done, and its numbers (or the error)."""
    if record.error is not None:
        return f"{record.name}: failed: {record.error}"
    done = ", ".join(record.actions) or record.status
    numbers = [f"win rate {_show(record.summary.get('win_rate'))}"] if record.summary else []
    if record.summary.get("designer"):
        numbers.append(f"designer {_show(record.summary['designer'])}")
    return f"{record.name}: {done}" + (f"; {', '.join(numbers)}" if numbers else "")


def format_table(records: Sequence[RunRecord]) -> str:
    """The sweep's runs as an aligned text table: status, win rate, designer score and KL."""
    header = ["run", "status", "win rate [CI]", "designer [CI]", "KL [nats]"]
    rows = [
        [
            r.name,
            r.status,
            _show(r.summary.get("win_rate")),
            _show(r.summary.get("designer")),
            "-" if r.summary.get("kl") is None else f"{r.summary['kl']:.3g}",
        ]
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
