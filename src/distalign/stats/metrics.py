"""Evaluation metrics: gold-reward win rate and means with bootstrap CIs, KL estimates; diversity and
length come from :mod:`distalign.stats.diversity`.

Everything here is pure numpy on arrays or lists of texts. Rewards of policy and reference are *paired by
prompt*: index i of both arrays belongs to the same held-out prompt, and the bootstrap resamples prompts
(indices) jointly across arrays so the pairing survives resampling. Texts are tokenised by splitting on
whitespace (``str.split()``), case and punctuation kept: the metrics compare models on equal footing
without depending on any model's tokenizer. :class:`EvalResult` is the schema of ``RUN_DIR/eval/eval.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distalign.stats.diversity import diversity_stats, length_stats

ArrayLike = Any  # list[float] | np.ndarray | torch.Tensor, 1-D


def as_array(values: ArrayLike) -> np.ndarray:
    """``values`` as a 1-D float64 numpy array (accepts lists, numpy arrays and CPU/GPU tensors)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval [low, high] from n samples."""

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        return cls(float(data["value"]), float(data["low"]), float(data["high"]), int(data["n"]))


def win_rate(policy_rewards: ArrayLike, reference_rewards: ArrayLike, *, ties: str = "half") -> float:
    """Share of prompts where the policy's gold reward beats the reference's (arrays [N], paired by index).

    ``ties``: "half" counts a tie as 1/2 win; "loss" as 0; "exclude" drops tied prompts (NaN if all tie).
    """
    policy, reference = as_array(policy_rewards), as_array(reference_rewards)
    if policy.shape != reference.shape or policy.size == 0:
        raise ValueError(
            f"win_rate needs two non-empty arrays of equal length, got {policy.size} and {reference.size}"
        )
    wins, tied = (policy > reference).astype(np.float64), policy == reference
    if ties == "half":
        return float(np.mean(wins + 0.5 * tied))
    if ties == "loss":
        return float(np.mean(wins))
    if ties == "exclude":
        return float(np.mean(wins[~tied])) if (~tied).any() else float("nan")
    raise ValueError(f"ties={ties!r} is not valid; choose 'half', 'loss' or 'exclude'")


def _resample_indices(
    rng: np.random.Generator, n_boot: int, size: int, groups: ArrayLike | None
) -> list[np.ndarray] | np.ndarray:
    """Index sets of ``n_boot`` bootstrap resamples of ``size`` items.

    Without ``groups``: ``size`` indices drawn with replacement. With ``groups`` ([size] labels, e.g. the
    prompt of each sample): as many groups as there are drawn with replacement, each bringing all of
    its items, so samples of one prompt stay together (a cluster bootstrap). With one item per group
    the draws are exactly those of the ungrouped bootstrap with the same seed.
    """
    if groups is None:
        return rng.integers(0, size, size=(n_boot, size))
    labels = np.asarray(groups).reshape(-1)
    if labels.size != size:
        raise ValueError(f"groups has {labels.size} labels for {size} values")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    # Groups numbered in order of first appearance, so results do not depend on how labels sort.
    rank = np.argsort(np.argsort(first))
    members = [np.flatnonzero(rank[inverse] == g) for g in range(first.size)]
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    if len({m.size for m in members}) == 1:
        return np.stack(members)[draws].reshape(n_boot, -1)
    return [np.concatenate([members[g] for g in row]) for row in draws]


def bootstrap_ci(
    stat_fn: Callable[..., float],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of ``stat_fn(*arrays)``.

    Each of ``n_boot`` resamples draws N indices with replacement and applies them to *all* arrays
    (each [N]) together. The bounds are the ``alpha/2`` and ``1 - alpha/2`` quantiles (linear
    interpolation) of the resampled statistics, ignoring NaN resamples. ``groups`` ([N] labels) makes it
    a cluster bootstrap: whole groups (e.g. all samples of one prompt) are resampled, see
    :func:`_resample_indices`.
    """
    data = [as_array(a) for a in arrays]
    if not data or len({a.size for a in data}) != 1 or data[0].size == 0:
        raise ValueError("bootstrap_ci needs one or more non-empty arrays of equal length")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    indices = _resample_indices(rng, n_boot, data[0].size, groups)
    stats = np.array([stat_fn(*(a[idx] for a in data)) for idx in indices], dtype=np.float64)
    low, high = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_with_ci(
    values: ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> Estimate:
    """Mean of ``values`` ([N]) with its bootstrap interval (over ``groups`` when given)."""
    data = as_array(values)
    low, high = bootstrap_ci(np.mean, data, n_boot=n_boot, alpha=alpha, seed=seed, groups=groups)
    return Estimate(float(data.mean()), low, high, int(data.size))


def win_rate_with_ci(
    policy_rewards: ArrayLike,
    reference_rewards: ArrayLike,
    *,
    ties: str = "half",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> Estimate:
    """:func:`win_rate` with its bootstrap interval (prompts resampled jointly for both models)."""
    policy, reference = as_array(policy_rewards), as_array(reference_rewards)
    value = win_rate(policy, reference, ties=ties)
    low, high = bootstrap_ci(
        lambda p, r: win_rate(p, r, ties=ties),
        policy,
        reference,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        groups=groups,
    )
    return Estimate(value, low, high, int(policy.size))


@dataclass
class KLEstimate:
    """Monte-Carlo estimates of KL(pi || ref) in nats per sequence, from samples y ~ pi.

    ``k1`` = mean of ``log pi(y) - log ref(y)``: unbiased, but single samples can be negative and noisy.
    ``k3`` = mean of ``(r - 1) - log r`` with ``r = ref(y) / pi(y)``: also unbiased (E_pi[r] = 1) and
    non-negative per sample, with lower variance when pi is close to ref; far from it, ``r`` has a heavy
    right tail (``log r`` is clipped at 700 to stay finite), so prefer ``k1`` there. (Schulman, 2020,
    "Approximating KL divergence".)
    """

    k1: Estimate
    k3: Estimate


def kl_estimate(
    policy_logprobs: ArrayLike,
    reference_logprobs: ArrayLike,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> KLEstimate:
    """KL(pi || ref) from sequence log-probs ([N] each, nats, summed over completion tokens) of N samples
    drawn from the policy, scored by the policy and by the reference; see :class:`KLEstimate`.
    ``groups``: prompt of each sample, for a bootstrap over prompts."""
    log_pi, log_ref = as_array(policy_logprobs), as_array(reference_logprobs)
    if log_pi.shape != log_ref.shape or log_pi.size == 0:
        raise ValueError("kl_estimate needs two non-empty log-prob arrays of equal length")
    log_ratio = np.minimum(log_ref - log_pi, 700.0)  # log r
    per_sample_k3 = np.expm1(log_ratio) - log_ratio
    boot = {"n_boot": n_boot, "alpha": alpha, "seed": seed, "groups": groups}
    k1 = mean_with_ci(log_pi - log_ref, **boot)
    k3 = mean_with_ci(per_sample_k3, **boot)
    return KLEstimate(k1=k1, k3=k3)


def quantile_curve(values: ArrayLike, levels: Sequence[float] | int = 21) -> tuple[list[float], list[float]]:
    """``(levels, quantiles)`` of ``values`` ([N]); an int means that many evenly spaced levels in [0, 1].

    Quantile curves of policy vs reference rewards show first-order dominance: the policy dominates
    when its curve lies on or above the reference's at every level.
    """
    grid = np.linspace(0.0, 1.0, levels) if isinstance(levels, int) else np.asarray(levels, dtype=np.float64)
    return grid.tolist(), np.quantile(as_array(values), grid).tolist()


@dataclass
class EvalResult:
    """Schema of ``RUN_DIR/eval/eval.json`` (``schema_version`` 1), written by ``distalign eval``.

    * ``task``, ``reward``: task name and gold-reward label; ``num_prompts``: held-out prompts evaluated.
    * ``gold_reward``: ``{"policy": Estimate, "reference": Estimate}``, mean gold reward with CI.
    * ``win_rate``: policy vs reference, paired by prompt, ties 1/2, with CI (``None`` without a reference).
    * ``kl``: :class:`KLEstimate` of KL(policy || reference) in nats per sequence (``None`` without log-probs).
    * ``quantiles``: ``{"levels": [...], "policy": [...], "reference": [...]}`` gold-reward quantile curves.
    * ``diversity``: per model, :func:`diversity_stats`; ``length``: per model, :func:`length_stats`.
    * ``dominance``: first-order dominance of the policy's gold rewards over the reference's
      (:func:`distalign.stats.dominance.dominance_metrics`: violation_rate, w1, signed_mean_gap, ...).
    * ``designer``: designer scores (``designer:`` config section) of the same samples, by name:
      ``"designer"`` is the composite ``r_aux = sum_k w_k normalise(r_k)`` (higher is better, normalised
      with the statistics fitted on the training data), then each reward by alias in its own raw units
      (``direction`` in ``settings["designer"]`` says which way is better). Each entry maps
      ``"policy"`` / ``"reference"`` to the mean with CI and ``"difference"`` to the mean of policy minus
      reference, paired by prompt and sample index, with CI. Empty without a designer section.
    * ``settings``: how the numbers were made (models, generation settings, seeds, n_boot, alpha).
    * ``samples_file``: path, relative to the JSON, of the per-sample JSONL, if one was written.
    """

    task: str
    reward: str
    num_prompts: int
    gold_reward: dict[str, Estimate]
    win_rate: Estimate | None = None
    kl: KLEstimate | None = None
    quantiles: dict[str, list[float]] = field(default_factory=dict)
    diversity: dict[str, dict[str, float]] = field(default_factory=dict)
    length: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    dominance: dict[str, float] = field(default_factory=dict)
    designer: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    samples_file: str | None = None
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer files stay readable."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["gold_reward"] = {k: Estimate.from_dict(v) for k, v in data["gold_reward"].items()}
        if data.get("win_rate") is not None:
            known["win_rate"] = Estimate.from_dict(data["win_rate"])
        known["designer"] = {
            name: {key: Estimate.from_dict(value) for key, value in entry.items()}
            for name, entry in (data.get("designer") or {}).items()
        }
        if data.get("kl") is not None:
            known["kl"] = KLEstimate(
                Estimate.from_dict(data["kl"]["k1"]), Estimate.from_dict(data["kl"]["k3"])
            )
        return cls(**known)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def evaluate_samples(
    policy_texts: Sequence[str],
    policy_rewards: ArrayLike,
    reference_texts: Sequence[str] | None = None,
    reference_rewards: ArrayLike | None = None,
    *,
    policy_logprobs: ArrayLike | None = None,
    reference_logprobs: ArrayLike | None = None,
    task: str = "",
    reward: str = "",
    settings: dict[str, Any] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> EvalResult:
    """All metrics for completions of held-out prompts from each model (arrays [N], paired by index).

    Index i of the policy's and the reference's arrays belongs to the same prompt. With one completion per
    prompt the bootstrap resamples indices; with several, pass ``groups`` ([N], the prompt of each index)
    so that whole prompts are resampled. ``policy_logprobs`` / ``reference_logprobs``: log-probs of the
    *policy's* samples under the policy and the reference (nats per sequence), for the KL estimate.
    """
    boot = {"n_boot": n_boot, "alpha": alpha, "seed": seed, "groups": groups}
    models: dict[str, tuple[Sequence[str], np.ndarray]] = {"policy": (policy_texts, as_array(policy_rewards))}
    if reference_texts is not None and reference_rewards is not None:
        models["reference"] = (reference_texts, as_array(reference_rewards))
    levels = np.linspace(0.0, 1.0, 21).tolist()
    result = EvalResult(
        task=task,
        reward=reward,
        num_prompts=len(policy_texts) if groups is None else len(np.unique(np.asarray(groups))),
        gold_reward={name: mean_with_ci(r, **boot) for name, (_, r) in models.items()},
        quantiles={
            "levels": levels,
            **{name: quantile_curve(r, levels)[1] for name, (_, r) in models.items()},
        },
        diversity={name: diversity_stats(texts, seed=seed) for name, (texts, _) in models.items()},
        length={name: length_stats(texts) for name, (texts, _) in models.items()},
        settings={**(settings or {}), "n_boot": n_boot, "alpha": alpha, "seed": seed},
    )
    if groups is not None:
        result.settings["bootstrap"] = "cluster: whole groups (prompts) resampled"
    if "reference" in models:
        result.win_rate = win_rate_with_ci(models["policy"][1], models["reference"][1], **boot)
    if policy_logprobs is not None and reference_logprobs is not None:
        result.kl = kl_estimate(policy_logprobs, reference_logprobs, **boot)
    return result
