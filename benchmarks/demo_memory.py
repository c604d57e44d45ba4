"""Peak resident memory of a distalign command, broken down by phase (``docs/benchmarks.md``, "Demo memory").

    python benchmarks/demo_memory.py [--json FILE] -- demo --output-dir /tmp/demo
    python benchmarks/demo_memory.py -- eval /tmp/demo/aot
    python benchmarks/demo_memory.py -- data make sentiment --model smollm2 --k 4 --num-prompts 64 ...

Runs the command in this process through ``distalign.cli.main`` with the library's own functions
wrapped (measurement only; nothing they compute changes). Each wrapped call is a labelled phase;
phases nest (the DPO run's "reference precompute" inside "train dpo"). At every phase boundary the
kernel's high-water mark of resident memory (``VmHWM``) is read and then reset (``echo 5 >
/proc/self/clear_refs``), so each interval's peak is exact, not sampled; a phase's peak is the highest
of its own intervals and its children's. Where the reset is not allowed, peaks fall back to a 20 ms
``VmRSS`` sampler. Calls of one label (every training step, every sampling batch) are aggregated:
the highest peak, the summed seconds, the count.

A phase's "RSS after" is the resident memory when it returned: what it left behind for the phases
after it (models still referenced, or freed memory the allocator kept).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return float(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {name}")


@dataclass
class PhaseRecord:
    label: str
    depth: int
    peak_mb: float = 0.0
    rss_before_mb: float | None = None
    rss_after_mb: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    calls: int = 0
    order: int = 0


@dataclass
class MemoryRecorder:
    """A stack of open phases; every boundary closes one interval whose peak goes to the open phases."""

    records: dict[str, PhaseRecord] = field(default_factory=dict)
    """Keyed by the path of labels from the whole command down."""
    stack: list[str] = field(default_factory=list)
    """The paths of the open phases, outermost first."""
    can_reset: bool = False
    sampled_peak_mb: float = 0.0

    def start(self) -> None:
        try:
            CLEAR_REFS.write_text("5")
            self.can_reset = True
        except OSError:
            self.can_reset = False
            threading.Thread(target=self._sample, daemon=True).start()
        self.records["(whole command)"] = PhaseRecord("(whole command)", 0, order=0)
        self.stack.append("(whole command)")
        self.records["(whole command)"].rss_before_mb = _status_mb("VmRSS")

    def _sample(self) -> None:
        while True:
            self.sampled_peak_mb = max(self.sampled_peak_mb, _status_mb("VmRSS"))
            time.sleep(0.02)

    def _close_interval(self) -> None:
        if self.can_reset:
            peak = _status_mb("VmHWM")
            CLEAR_REFS.write_text("5")
        else:
            peak = max(self.sampled_peak_mb, _status_mb("VmRSS"))
            self.sampled_peak_mb = 0.0
        for label in self.stack:  # a child's peak is also its parents'
            self.records[label].peak_mb = max(self.records[label].peak_mb, peak)

    def enter(self, label: str) -> tuple[float, float]:
        """Open phase ``label`` inside the open ones: records are keyed by the path of labels, so the
        DPO run's "optimizer steps" and the AOT run's are two rows."""
        self._close_interval()
        path = f"{self.stack[-1]}/{label}"
        record = self.records.get(path)
        if record is None:
            record = self.records[path] = PhaseRecord(label, len(self.stack), order=len(self.records))
        if record.rss_before_mb is None:
            record.rss_before_mb = _status_mb("VmRSS")
        record.calls += 1
        self.stack.append(path)
        return time.perf_counter(), time.process_time()

    def exit(self, path: str, started: tuple[float, float]) -> None:
        self._close_interval()
        record = self.records[path]
        record.seconds += time.perf_counter() - started[0]
        record.cpu_seconds += time.process_time() - started[1]
        record.rss_after_mb = _status_mb("VmRSS")
        self.stack.pop()

    def finish(self) -> None:
        self._close_interval()
        whole = self.records["(whole command)"]
        whole.rss_after_mb = _status_mb("VmRSS")

    def table(self) -> str:
        lines = [
            "| phase | calls | peak RSS MB | RSS before MB | RSS after MB | wall s | CPU s |",
            "|---|---|---|---|---|---|---|",
        ]
        for record in sorted(self.records.values(), key=lambda r: r.order):
            name = "&nbsp;&nbsp;" * record.depth + record.label
            lines.append(
                f"| {name} | {record.calls or 1} | {record.peak_mb:.0f} | {record.rss_before_mb or 0:.0f} "
                f"| {record.rss_after_mb:.0f} | {record.seconds:.1f} | {record.cpu_seconds:.1f} |"
            )
        return "\n".join(lines)


RECORDER = MemoryRecorder()


def wrap(module_name: str, attribute: str, label) -> None:
    """Replace ``module.attribute`` (a function, or ``Class.method``) by a version recorded as a phase;
    ``label`` is a string or a function of the call's arguments."""
    module = importlib.import_module(module_name)
    owner_name, _, name = attribute.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    original = owner.__dict__[name] if owner_name else getattr(owner, name)
    is_classmethod = isinstance(original, classmethod)
    function = original.__func__ if is_classmethod else original

    @functools.wraps(function)
    def recorded(*args, **kwargs):
        text = label(*args, **kwargs) if callable(label) else label
        started = RECORDER.enter(text)
        path = RECORDER.stack[-1]
        try:
            return function(*args, **kwargs)
        finally:
            RECORDER.exit(path, started)

    setattr(owner, name, classmethod(recorded) if is_classmethod else recorded)


def _run_label(config, *args, **kwargs) -> str:
    return f"train {config.loss.name}"


def _samples_label(*args, description: str = "sample", **kwargs) -> str:
    return description


# (module, function, phase label); a label may be a function of the call's arguments.
PHASES = [
    ("distalign.demo", "_load_base", "load base model"),
    ("distalign.demo", "_make_pairs", "data"),
    ("distalign.tasks.sampler", "make_task_dataset", "make task dataset"),
    ("distalign.models.sampling", "sample_completions", "sample completions (batches)"),
    ("distalign.tasks.make", "make_dataset", "build rows (gold reward, pairs)"),
    ("distalign.train.offline", "train_offline", _run_label),
    ("distalign.train.offline", "load_policy", "load policy"),
    ("distalign.train.offline", "load_offline_data", "tokenise data"),
    ("distalign.train.offline", "ReferenceLogps.build", "reference log-probs (precompute)"),
    ("distalign.train.engine", "Engine.prepare", "prepare optimizer"),
    ("distalign.train.offline", "_train_step", "optimizer steps"),
    ("distalign.train.offline", "write_dominance_summary", "dominance summary (no-grad pass)"),
    ("distalign.train.offline", "save_final", "save final/"),
    ("distalign.demo", "_evaluate", "evaluate"),
    ("distalign.eval.run", "evaluate_run", "evaluate run"),
    ("distalign.eval.run", "load_eval_model", "load eval model"),
    ("distalign.eval.run", "load_trained_model", "load trained model"),
    ("distalign.eval.run", "draw_samples", _samples_label),
    ("distalign.eval.run", "score_samples", "reference scores policy samples"),
    ("distalign.eval.outcome", "write_eval", "write eval/"),
    ("distalign.eval.report", "write_report", "report"),
]


# Functions older library versions lack (skipped there, so a "before" version can be measured too).
OPTIONAL_PHASES = {"load_trained_model"}  # since model.lora.save_merged


def install_phases() -> None:
    """The phases of the demo, of ``distalign eval`` and of ``distalign data make``."""
    for module, name, label in PHASES:
        if name in OPTIONAL_PHASES and not hasattr(importlib.import_module(module), name):
            continue
        wrap(module, name, label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the phases as JSON here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then a distalign command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a distalign command after --")

    from distalign.cli import main as distalign_main
    from distalign.cli import prefer_passive_openmp

    prefer_passive_openmp()  # as the CLI does, before the wrapped modules import torch
    RECORDER.start()
    imported = time.perf_counter()
    install_phases()

    started, cpu_started = time.perf_counter(), time.process_time()
    status = distalign_main(command)
    RECORDER.records["(whole command)"].seconds = time.perf_counter() - started
    RECORDER.records["(whole command)"].cpu_seconds = time.process_time() - cpu_started
    RECORDER.finish()
    print(f"\ncommand: distalign {' '.join(command)} (exit status {status})")
    print(
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; imports {started - imported:.1f} s"
    )
    print(
        f"peak RSS of the whole process (VmHWM before the last reset): {RECORDER.records['(whole command)'].peak_mb:.0f} MB"
    )
    print("peaks exact (VmHWM reset at each boundary)" if RECORDER.can_reset else "peaks sampled every 20 ms")
    print(RECORDER.table())
    if args.json:
        Path(args.json).write_text(
            json.dumps([vars(r) for r in sorted(RECORDER.records.values(), key=lambda r: r.order)], indent=1)
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
