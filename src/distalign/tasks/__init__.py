"""Built-in tasks with gold rewards that need no network, and the datasets built from them.

``get_task("sentiment" | "readability" | "keyword", **settings)`` returns a :class:`Task` (train and
held-out prompts, a gold :class:`~distalign.rewards.RewardFn`). ``build_preference_dataset`` samples
completions with a caller-supplied sampler and labels pairs by the gold reward;
``write_jsonl_with_provenance`` saves any rows with a record of how they were made, and
``make_dataset`` does both in one call (``distalign data make TASK``).
"""

from distalign.tasks import keyword, readability, sentiment  # noqa: F401  (registers the built-in tasks)
from distalign.tasks.base import TASKS, Split, Task, expand_templates, get_task, split_prompts
from distalign.tasks.builders import (
    PreferenceDataset,
    SampleFn,
    bt_flip_probability,
    build_preference_dataset,
    pair_best_worst,
    prompt_only_rows,
    sample_and_score,
    select_prompts,
    to_conversational,
    unpaired_rows,
)
from distalign.tasks.io import library_versions, provenance_path, read_jsonl, write_jsonl_with_provenance
from distalign.tasks.make import KINDS, make_dataset

__all__ = [
    "KINDS",
    "TASKS",
    "PreferenceDataset",
    "SampleFn",
    "Split",
    "Task",
    "bt_flip_probability",
    "build_preference_dataset",
    "expand_templates",
    "get_task",
    "library_versions",
    "make_dataset",
    "pair_best_worst",
    "prompt_only_rows",
    "provenance_path",
    "read_jsonl",
    "sample_and_score",
    "select_prompts",
    "split_prompts",
    "to_conversational",
    "unpaired_rows",
    "write_jsonl_with_provenance",
]
