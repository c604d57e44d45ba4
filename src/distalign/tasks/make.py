"""``make_dataset``: one call from a task and a sampler to a JSONL file with its provenance.

This is the body of ``distalign data make TASK``; the CLI only loads the base model and turns it into a
``sample_fn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distalign.rewards.base import check_choice
from distalign.tasks.base import Split, Task
from distalign.tasks.builders import (
    SampleFn,
    build_preference_dataset,
    prompt_only_rows,
    to_conversational,
    unpaired_rows,
)
from distalign.tasks.io import write_jsonl_with_provenance

#: Row formats (TRL conventions): best-vs-worst pairs, their unpaired split, every scored sample as a
#: listwise row, or the prompts alone (no sampling).
KINDS = ("paired", "unpaired", "listwise", "prompt")

#: Where ``distalign data make`` writes without ``--output``, relative to the current directory. Generated
#: files are run outputs like the runs themselves (``runs/NAME``): kept together, out of the working
#: directory's top level, and out of version control (the repository ignores ``runs/``).
DEFAULT_DATA_DIR = Path("runs") / "data"


def default_output_path(task: str, kind: str) -> Path:
    """``runs/data/TASK_KIND.jsonl``: the file ``distalign data make TASK --kind KIND`` writes by default."""
    return DEFAULT_DATA_DIR / f"{task}_{kind}.jsonl"


def make_dataset(
    task: Task,
    path: str | Path,
    *,
    sample_fn: SampleFn | None = None,
    kind: str = "paired",
    k: int = 4,
    seed: int = 0,
    bt_noise: float | None = None,
    num_prompts: int | None = None,
    split: Split = "train",
    conversational: bool = False,
    model: str = "",
    sampling: dict[str, Any] | None = None,
) -> Path:
    """Build ``kind`` rows from ``task`` and write them with provenance; returns the JSONL path.

    ``sample_fn`` is required for every kind but "prompt". ``model`` and ``sampling`` (e.g. temperature,
    max_new_tokens, sampler seed) describe the sampler for the provenance record, which also holds the
    task, its settings, the gold-reward spec, the builder settings and the counts (prompts, samples,
    pairs, ties skipped, pairs flipped by noise).
    """
    check_choice("kind", kind, KINDS)
    counts: dict[str, int]
    if kind == "prompt":
        rows = prompt_only_rows(task, split=split, num_prompts=num_prompts, seed=seed)
        counts = {"prompts": len(rows)}
    else:
        if sample_fn is None:
            raise ValueError(f"kind={kind!r} samples completions: pass sample_fn")
        built = build_preference_dataset(
            task, sample_fn, k=k, seed=seed, bt_noise=bt_noise, num_prompts=num_prompts, split=split
        )
        rows = {"paired": built.rows, "unpaired": unpaired_rows(built.rows), "listwise": built.samples}[kind]
        counts = built.counts
    if conversational:
        rows = to_conversational(task, rows)
    provenance = {
        "task": task.name,
        "task_settings": task.settings,
        "gold_reward": task.gold_reward.spec(),
        "kind": kind,
        "model": model,
        "sampling": sampling or {},
        "seed": seed,
        "settings": {
            "k": k,
            "bt_noise": bt_noise,
            "num_prompts": num_prompts,
            "split": split,
            "conversational": conversational,
        },
        "counts": counts,
    }
    return write_jsonl_with_provenance(rows, path, provenance)
