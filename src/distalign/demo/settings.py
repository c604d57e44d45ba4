"""The demo's presets (:class:`DemoSettings`: ``SMOLLM2``, the default, and ``TINY``) and what each is
measured to take (:data:`MEASURED`), from which the demo says its expected time before it starts."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo; :data:`SMOLLM2` and :data:`TINY` are the two shipped presets."""

    model: str
    lora: bool
    train_prompts: int
    """Training prompts of the sentiment task sampled for preference pairs."""
    k: int
    """Completions sampled per training prompt (the best and the worst form a pair)."""
    data_max_new_tokens: int
    steps: int
    batch_size: int
    """Pairs per optimizer step; AOT sorts (couples) over all of them."""
    micro_batch_size: int
    lr: float
    lora_r: int
    beta: float
    """Both losses' beta (logistic cost, same meaning in DPO and AOT)."""
    eval_prompts: int
    eval_samples_per_prompt: int
    eval_max_new_tokens: int
    sample_batch_size: int
    max_length: int = 192
    max_prompt_length: int = 96
    seed: int = 0
    no_grad_micro_batch_size: int | None = None
    """Pairs per forward pass without gradients (reference precompute, AOT's coupling pass, the
    dominance summary); None: twice ``micro_batch_size``."""
    packing: bool = True
    """Padding-free batches, each pair's prompt laid out once for its two completions (exact)."""


# Sized to finish well under 10 minutes on 2 CPU cores; docs/demo.md has the measurement and the
# choices. Micro-batches of 2 pairs keep a training step's activations (about 0.5 GB, where one
# micro-batch of 16 pairs needs 3.6 GB) and with them the demo's peak memory near 2 GB; passes without
# gradients take 8 pairs at a time, nearly as fast as 16 for 0.2 GB less (docs/benchmarks.md, "Demo
# memory").
SMOLLM2 = DemoSettings(
    model="smollm2",
    lora=True,
    train_prompts=64,
    k=4,
    data_max_new_tokens=32,
    steps=8,
    batch_size=16,
    micro_batch_size=2,
    no_grad_micro_batch_size=8,
    lr=5e-4,
    lora_r=16,
    beta=0.1,
    eval_prompts=48,
    eval_samples_per_prompt=2,
    eval_max_new_tokens=32,
    sample_batch_size=32,
)

# The tiny random model has no sentiment to speak of; this preset checks the pipeline in seconds.
TINY = DemoSettings(
    model="tiny",
    lora=False,
    train_prompts=48,
    k=6,
    data_max_new_tokens=24,
    steps=16,
    batch_size=16,
    micro_batch_size=8,
    lr=1e-3,
    lora_r=8,
    beta=0.1,
    eval_prompts=16,
    eval_samples_per_prompt=2,
    eval_max_new_tokens=24,
    sample_batch_size=32,
    max_length=96,
    max_prompt_length=64,
)


@dataclass(frozen=True)
class MeasuredTimes:
    """Wall seconds per demo phase measured on 2 CPU cores (docs/demo.md, "Wall time"), the training
    phases at ``steps`` optimizer steps each; ``peak_memory_gb``: peak resident memory, when measured."""

    phases: dict[str, float]
    steps: int
    peak_memory_gb: float | None = None


#: The measurements each preset's estimate is based on (keyed by ``DemoSettings.model``).
MEASURED = {
    # SmolLM2, packed, 2-core machine alone (1-minute load average 1.0-1.7 with the demo itself), fresh
    # reference cache: 8 min 15 s wall in all (491 s; another run 7 min 39 s), 2.1 GB peak RSS.
    # "eval" includes loading the base again.
    "smollm2": MeasuredTimes(
        {"load": 3.4, "data": 60.0, "train_dpo": 163.3, "train_aot": 164.8, "eval": 95.9, "report": 2.9},
        steps=8,
        peak_memory_gb=2.1,
    ),
    # Tiny model, CPU seconds per phase (a busy 2-core machine's wall time was twice that).
    "tiny": MeasuredTimes(
        {"load": 3, "data": 1, "train_dpo": 2, "train_aot": 2, "eval": 1, "report": 3.5}, steps=16
    ),
}

PHASE_NAMES = {"train_dpo": "DPO", "train_aot": "AOT"}


def estimated_seconds(settings: DemoSettings) -> float | None:
    """Expected wall seconds of the demo on 2 idle CPU cores: the measured phases of its preset, the
    training phases scaled to ``settings.steps``; None for a model without a measurement."""
    measured = MEASURED.get(settings.model)
    if measured is None:
        return None
    return sum(
        seconds * (settings.steps / measured.steps if name.startswith("train_") else 1.0)
        for name, seconds in measured.phases.items()
    )


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{5 * max(1, math.ceil(seconds / 5))} seconds"
    return f"{round(seconds / 60)} minutes"


def estimate_line(settings: DemoSettings, device: str = "cpu") -> str | None:
    """What the demo will take, said before it starts: its phases and the time (and memory) measured
    on 2 CPU cores, scaled to the steps asked for; None for a model without a measurement."""
    total = estimated_seconds(settings)
    if total is None:
        return None
    measured = MEASURED[settings.model]
    phases = ", ".join(
        f"{PHASE_NAMES.get(name, name)} {seconds:g} s" for name, seconds in measured.phases.items()
    )
    scaled = f", training scaled to {settings.steps} steps" if settings.steps != measured.steps else ""
    memory = f", peak memory about {measured.peak_memory_gb:g} GB" if measured.peak_memory_gb else ""
    where = "; a GPU is used here, so expect less" if device != "cpu" else "; longer on a busy machine"
    return (
        f"6 phases, about {duration_text(total)} on 2 idle CPU cores{memory} "
        f"(measured per phase: {phases}{scaled}; docs/demo.md){where}"
    )
