"""What an evaluation produced and how it is written: the prompts, each model's samples, the result
(:class:`~distalign.stats.metrics.EvalResult`), and ``OUT/eval.json``, ``OUT/samples.jsonl`` and the
gold-reward plots. :mod:`distalign.eval.run` computes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distalign.stats.dominance import plot_quantile_curves as plot_dominance
from distalign.stats.metrics import EvalResult
from distalign.tasks import Task


@dataclass
class EvalPrompts:
    """The prompts one evaluation uses: raw task prompts and the text the models are conditioned on."""

    task: Task
    prompts: list[str]
    rendered: list[str]
    use_chat_template: bool


@dataclass
class ModelSamples:
    """Completions of one model, prompt-major (``samples_per_prompt`` per prompt); arrays are [N]."""

    prompt_index: np.ndarray
    texts: list[str]
    completion_ids: list[list[int]]
    logprobs: np.ndarray
    rewards: np.ndarray
    ended_with_eos: np.ndarray
    designer: dict[str, np.ndarray] | None = None


@dataclass
class EvalOutcome:
    """An evaluation's result with the samples it was computed from."""

    result: EvalResult
    prompts: EvalPrompts
    policy: ModelSamples
    reference: ModelSamples
    reference_logprobs_of_policy: np.ndarray


def write_eval(outcome: EvalOutcome, out_dir: str | Path, *, save_samples: bool = True) -> Path:
    """Write ``eval.json``, ``samples.jsonl`` (optional) and the PNGs into ``out_dir``; returns eval.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = outcome.result
    if save_samples:
        _write_samples(outcome, out_dir / "samples.jsonl")
        result.samples_file = "samples.jsonl"
    reward = result.reward or "gold reward"
    plot_dominance(
        outcome.policy.rewards,
        outcome.reference.rewards,
        out_dir / "gold_reward_quantiles.png",
        labels=("policy", "reference"),
        title=f"Gold-reward quantiles ({reward}): policy vs reference",
        ylabel=reward,
    )
    _plot_reward_histogram(outcome, out_dir / "gold_reward_histogram.png", reward)
    return result.save(out_dir / "eval.json")


def _write_samples(outcome: EvalOutcome, path: Path) -> None:
    lines = []
    for role, samples in (("policy", outcome.policy), ("reference", outcome.reference)):
        for i, text in enumerate(samples.texts):
            row = {
                "model": role,
                "prompt": outcome.prompts.prompts[int(samples.prompt_index[i])],
                "completion": text,
                "gold_reward": float(samples.rewards[i]),
                "logprob": float(samples.logprobs[i]),
                "ended_with_eos": bool(samples.ended_with_eos[i]),
            }
            if role == "policy":
                row["reference_logprob"] = float(outcome.reference_logprobs_of_policy[i])
            if samples.designer is not None:
                row["designer"] = {name: float(values[i]) for name, values in samples.designer.items()}
            lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot_reward_histogram(outcome: EvalOutcome, path: Path, reward: str) -> Path:
    from matplotlib.figure import Figure

    values = np.concatenate([outcome.policy.rewards, outcome.reference.rewards])
    bins = np.histogram_bin_edges(values, bins=20)
    figure = Figure(figsize=(5.6, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    for label, samples, color in (
        ("reference", outcome.reference, "tab:red"),
        ("policy", outcome.policy, "tab:blue"),
    ):
        axes.hist(samples.rewards, bins=bins, alpha=0.5, label=label, color=color)
    axes.set_xlabel(reward)
    axes.set_ylabel("completions")
    axes.set_title("Gold-reward histogram")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    return path
