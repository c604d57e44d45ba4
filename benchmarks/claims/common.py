"""What the claim scripts share: a preference world whose truth is known, training through the library's
own objectives, exact evaluation, paired statistics over seeds, and a resumable results file.

**The world.** ``contexts`` prompts with ``responses`` candidate responses each. A tabular policy has one
logit per (prompt, response); the reference pi_ref (the "SFT model") is a random tabular policy the
policy starts from. Every response has a true reward r*(c, y) ~ N(0, 1): preference labels are drawn
from it (Bradley-Terry, then a fraction of labels flipped), and every evaluation number below is exact
(a sum over the table), never estimated from samples:

  true_reward       E_c E_{y~pi}[r*]                 (its gain over pi_ref is the alignment)
  kl                E_c KL(pi(.|c) || pi_ref(.|c))
  win_rate          P(y ~ pi beats y' ~ pi_ref under Bradley-Terry on r*), averaged over prompts
  pair_accuracy     share of all response pairs (weighted by pi_ref x pi_ref) whose implicit reward
                    log pi/pi_ref orders them as r* does
  violation_rate /  first-order dominance of the policy's reward distribution over pi_ref's: the
  w1_violation      quantile levels where Q_pi(t) < Q_ref(t), and the W1 mass of those gaps

**Training** runs :class:`distalign.train.objective.BatchObjective` (the registered loss x the
registered aggregator, what ``distalign train`` runs) on the per-pair log-probs of the table, full
batch, with Adam: the losses and aggregators are the library's; only the model is a table.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distalign.losses import get_aggregator, get_loss
from distalign.losses.base import PairedStats, UnpairedStats
from distalign.losses.quantiles import quantile_grid
from distalign.train.objective import BatchObjective

DTYPE = torch.float64


# ------------------------------------------------------------------------------------------- world
@dataclass
class World:
    """The prompts, responses, their true rewards and the reference policy of one seed."""

    contexts: int
    responses: int
    reward: torch.Tensor  # [C, K] true reward r*
    ref_logits: torch.Tensor  # [C, K] pi_ref's logits (the policy starts here)

    @classmethod
    def draw(cls, seed: int, contexts: int = 16, responses: int = 8, ref_scale: float = 1.0) -> World:
        generator = torch.Generator().manual_seed(seed)
        reward = torch.randn(contexts, responses, generator=generator, dtype=DTYPE)
        ref_logits = ref_scale * torch.randn(contexts, responses, generator=generator, dtype=DTYPE)
        return cls(contexts, responses, reward, ref_logits)

    @property
    def ref_logp(self) -> torch.Tensor:
        return torch.log_softmax(self.ref_logits, dim=-1)


@dataclass
class Pairs:
    """Preference pairs: prompt index, chosen and rejected response index, and whether the label was
    flipped (for diagnosis only; training sees the flipped labels)."""

    context: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    flipped: torch.Tensor
    source: torch.Tensor | None = None  # optional integer source per pair

    def __len__(self) -> int:
        return int(self.context.numel())

    def subset(self, index: torch.Tensor) -> Pairs:
        source = None if self.source is None else self.source[index]
        return Pairs(
            self.context[index], self.chosen[index], self.rejected[index], self.flipped[index], source
        )


def sample_responses(logits: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One response per entry of ``context`` from softmax(logits[context])."""
    probs = torch.softmax(logits[context], dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def draw_pairs(
    world: World,
    count: int,
    generator: torch.Generator,
    *,
    flip: float = 0.0,
    label_reward: torch.Tensor | None = None,
    proposal_logits: torch.Tensor | None = None,
) -> Pairs:
    """``count`` pairs: a prompt uniformly, two distinct responses from ``proposal_logits`` (default
    pi_ref), the preferred one drawn by Bradley-Terry on ``label_reward`` (default r*), then a ``flip``
    fraction of the labels swapped (exactly that many, at random)."""
    label_reward = world.reward if label_reward is None else label_reward
    logits = world.ref_logits if proposal_logits is None else proposal_logits
    context = torch.randint(world.contexts, (count,), generator=generator)
    first = sample_responses(logits, context, generator)
    second = sample_responses(logits, context, generator)
    for _ in range(100):  # redraw ties
        same = first == second
        if not bool(same.any()):
            break
        second[same] = sample_responses(logits, context[same], generator)
    keep = first != second
    context, first, second = context[keep], first[keep], second[keep]
    gap = label_reward[context, first] - label_reward[context, second]
    first_wins = torch.rand(gap.shape, generator=generator, dtype=DTYPE) < torch.sigmoid(gap)
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    flipped = torch.zeros_like(chosen, dtype=torch.bool)
    if flip > 0:
        flipped[torch.randperm(len(chosen), generator=generator)[: round(flip * len(chosen))]] = True
        chosen, rejected = torch.where(flipped, rejected, chosen), torch.where(flipped, chosen, rejected)
    return Pairs(context, chosen, rejected, flipped)


def split(pairs: Pairs, fractions: Sequence[float], generator: torch.Generator) -> list[Pairs]:
    """Disjoint random parts of ``pairs`` in the given proportions (the last takes the rest)."""
    order = torch.randperm(len(pairs), generator=generator)
    parts, start = [], 0
    for i, fraction in enumerate(fractions):
        end = len(pairs) if i == len(fractions) - 1 else start + round(fraction * len(pairs))
        parts.append(pairs.subset(order[start:end]))
        start = end
    return parts


# ---------------------------------------------------------------------------------------- training
@dataclass
class Method:
    """A loss x aggregator with options (what a config's ``loss`` and ``aggregator`` sections say)."""

    loss: str
    loss_options: dict[str, Any] = field(default_factory=dict)
    aggregator: str = "mean"
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    sft_weight: float = 0.0

    def objective(self) -> BatchObjective:
        return BatchObjective(
            loss=get_loss(self.loss),
            aggregator=get_aggregator(self.aggregator),
            loss_options=dict(self.loss_options),
            aggregator_options=dict(self.aggregator_options),
            sft_weight=self.sft_weight,
        )

    def describe(self) -> str:
        parts = [self.loss, *(f"{k}={v}" for k, v in self.loss_options.items())]
        if self.aggregator != "mean":
            parts += [self.aggregator, *(f"{k}={v}" for k, v in self.aggregator_options.items())]
        if self.sft_weight:
            parts.append(f"sft_weight={self.sft_weight}")
        return " ".join(parts)


StatsBuilder = Callable[[torch.Tensor, torch.Tensor | None], PairedStats | UnpairedStats]


def paired_stats(
    world: World, pairs: Pairs, weights: torch.Tensor | None = None, signals=None
) -> StatsBuilder:
    """Builds the statistics of ``pairs`` from the policy's log-probs [C, K] (and value head [C])."""
    ref = world.ref_logp
    ones = torch.ones(len(pairs), dtype=DTYPE)

    def build(logp: torch.Tensor, value: torch.Tensor | None) -> PairedStats:
        return PairedStats(
            policy_chosen_logps=logp[pairs.context, pairs.chosen],
            policy_rejected_logps=logp[pairs.context, pairs.rejected],
            chosen_lengths=ones,
            rejected_lengths=ones,
            ref_chosen_logps=ref[pairs.context, pairs.chosen],
            ref_rejected_logps=ref[pairs.context, pairs.rejected],
            weights=weights,
            signals=dict(signals or {}),
            heads={} if value is None else {"value": value[pairs.context]},
        )

    return build


def train(
    world: World,
    method: Method,
    build_stats: StatsBuilder,
    *,
    steps: int = 150,
    lr: float = 0.05,
    record: Callable[[int, torch.Tensor, dict[str, float]], None] | None = None,
) -> torch.Tensor:
    """Train the table from pi_ref with ``method`` on the statistics ``build_stats`` gives; returns the
    final log-probs [C, K]. A value table V[c] is trained beside it when the loss reads a value head.
    ``record(step, logp, metrics)`` is called after every step."""
    logits = world.ref_logits.clone().requires_grad_(True)
    params = [logits]
    objective = method.objective()
    value = None
    if "value" in objective.heads:
        value = torch.zeros(world.contexts, dtype=DTYPE, requires_grad=True)
        params.append(value)
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        logp = torch.log_softmax(logits, dim=-1)
        result = objective(build_stats(logp, value))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        objective.advance(result)
        if record is not None:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in result.metrics.items()}
                record(step, torch.log_softmax(logits, dim=-1), {"loss": float(result.loss), **metrics})
    return torch.log_softmax(logits.detach(), dim=-1)


# -------------------------------------------------------------------------------------- evaluation
def reward_distribution(world: World, logp: torch.Tensor, reward: torch.Tensor | None = None):
    """The atoms and probabilities of r(c, y) for c uniform and y ~ pi(.|c): ([C K], [C K])."""
    reward = world.reward if reward is None else reward
    return reward.reshape(-1), (logp.exp() / world.contexts).reshape(-1)


def dominance(world: World, logp: torch.Tensor, versus: torch.Tensor | None = None) -> dict[str, float]:
    """Exact first-order dominance of the reward distribution under ``logp`` over the one under
    ``versus`` (default pi_ref), on the library's quantile grid (distalign.losses.quantiles)."""
    versus = world.ref_logp if versus is None else versus
    atoms, mass = reward_distribution(world, logp)
    ref_atoms, ref_mass = reward_distribution(world, versus)
    keep, ref_keep = mass > 1e-15, ref_mass > 1e-15
    grid = quantile_grid(
        atoms[keep], ref_atoms[ref_keep], positive_weights=mass[keep], negative_weights=ref_mass[ref_keep]
    )
    gaps, levels = grid.gaps, grid.mass
    return {
        "violation_rate": float((levels * (gaps < 0)).sum()),
        "w1_violation": float((levels * torch.relu(-gaps)).sum()),
    }


def evaluate(world: World, logp: torch.Tensor, reward: torch.Tensor | None = None) -> dict[str, float]:
    """The exact metrics of the module docstring for the policy ``logp`` [C, K]."""
    reward = world.reward if reward is None else reward
    pi, ref = logp.exp(), world.ref_logp.exp()
    kl = (pi * (logp - world.ref_logp)).sum(-1).mean()
    beats = torch.sigmoid(reward.unsqueeze(-1) - reward.unsqueeze(-2))  # [C, K, K']: P(y beats y')
    win_rate = torch.einsum("ck,cj,ckj->c", pi, ref, beats).mean()
    implicit = logp - world.ref_logp
    agree = (
        torch.sign(implicit.unsqueeze(-1) - implicit.unsqueeze(-2))
        == torch.sign(reward.unsqueeze(-1) - reward.unsqueeze(-2))
    ).double()
    pair_weight = ref.unsqueeze(-1) * ref.unsqueeze(-2) * (1 - torch.eye(world.responses, dtype=DTYPE))
    accuracy = (pair_weight * agree).sum() / pair_weight.sum()
    return {
        "true_reward": float((pi * reward).sum(-1).mean()),
        "true_reward_gain": float(((pi - ref) * reward).sum(-1).mean()),
        "kl": float(kl),
        "win_rate": float(win_rate),
        "pair_accuracy": float(accuracy),
        **dominance(world, logp),
    }


def pair_log_likelihood(logp: torch.Tensor, world: World, pairs: Pairs, beta: float) -> float:
    """Mean Bradley-Terry log-likelihood of the (observed, possibly noisy) labels of ``pairs`` under the
    policy's implicit reward beta * log pi/pi_ref: the validation score hyperparameters are chosen by
    (observable in practice, unlike r*)."""
    implicit = beta * (logp - world.ref_logp)
    margin = implicit[pairs.context, pairs.chosen] - implicit[pairs.context, pairs.rejected]
    return float(torch.nn.functional.logsigmoid(margin).mean())


def pair_agreement(logp: torch.Tensor, world: World, pairs: Pairs) -> float:
    """Share of ``pairs`` whose observed label the implicit reward log pi/pi_ref agrees with."""
    implicit = logp - world.ref_logp
    return float(
        (implicit[pairs.context, pairs.chosen] > implicit[pairs.context, pairs.rejected]).double().mean()
    )


# -------------------------------------------------------------------------------------- statistics
# Two-sided 97.5% quantiles of Student's t (df 1..30): the 95% interval of a mean over seeds.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float

    def __str__(self) -> str:
        return f"{self.mean:+.3g} [{self.low:+.3g}, {self.high:+.3g}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def detectable(self) -> float:
        """The smallest true mean difference this design detects with 80% power at the 5% level
        (about 2.8 standard errors)."""
        return 2.8 * self.sd / math.sqrt(self.n) if self.n > 1 else math.inf


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (paired differences over seeds, say)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, math.nan)
    sd = statistics.stdev(values)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def verdict(interval: Interval, claimed_sign: int) -> str:
    """reproduced / reversed / inconclusive for a claim that the difference has ``claimed_sign``."""
    if interval.sd == 0:
        return "no difference in any seed"
    if not interval.excludes_zero:
        return f"inconclusive (detectable effect about {interval.detectable:.2g})"
    return "reproduced" if (interval.mean > 0) == (claimed_sign > 0) else "reversed"


# -------------------------------------------------------------------------------- results on disk
class Results:
    """Append-only JSON lines keyed by a string: a rerun skips what is already there (resumable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def get_or_run(self, key: str, run: Callable[[], dict]) -> dict:
        if key not in self.records:
            record = {"key": key, **run()}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.records[key] = record
        return self.records[key]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def as_dict(obj) -> dict:
    return asdict(obj)
