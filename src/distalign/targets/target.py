"""The energy-based target of f-DPG: P(x|c) = a(x|c) * prod_k score_k(x, c)  (fdpg.md, "Targets").

The base log-prob log a(x|c) comes in as a tensor, because the training loop already computes it with
the model; the target adds the scorers' log-scores. Hybrids are just several scorers (a constraint and
a moment tilt, say). A *conditional* target has one partition function Z_c per context c (CDPG); the
target itself does not normalise, it tells the log Z estimator to key on contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distalign.targets.moments import MomentFit
from distalign.targets.scorers import MomentTilt, Scorer, build_scorer


@dataclass
class Target:
    """Unnormalised target P = a * prod(scorers). ``conditional``: estimate one log Z per context."""

    scorers: list[Scorer] = field(default_factory=list)
    conditional: bool = False

    @classmethod
    def from_config(cls, spec: dict[str, Any]) -> Target:
        """Build from ``{"scorers": [{"kind": ..., ...}, ...], "conditional": bool}``."""
        unknown = set(spec) - {"scorers", "conditional"}
        if unknown:
            raise ValueError(
                f"target spec has unknown keys {sorted(unknown)}; expected 'scorers', 'conditional'"
            )
        return cls([build_scorer(s) for s in spec.get("scorers", [])], bool(spec.get("conditional", False)))

    def log_scores(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        """Sum of the scorers' log-scores: [N] float64 (0 with no scorers, -inf where a factor is 0)."""
        if contexts is not None and len(contexts) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(contexts)} contexts")
        total = torch.zeros(len(completions), dtype=torch.float64)
        for scorer in self.scorers:
            scores = scorer.log_score(list(completions), None if contexts is None else list(contexts))
            if scores.shape != total.shape:
                raise ValueError(
                    f"scorer {scorer!r} returned shape {tuple(scores.shape)}, expected {tuple(total.shape)}"
                )
            total = total + scores.double().cpu()
        return total

    def log_unnormalized(
        self, base_logprobs: torch.Tensor, completions: list[str], contexts: list[str] | None = None
    ) -> torch.Tensor:
        """log P(x_j|c_j) = log a(x_j|c_j) + sum_k log score_k: [N] float64, on ``base_logprobs``' device.

        ``base_logprobs`` [N]: sequence log-probs under the base model, summed over tokens incl. EOS.
        """
        if base_logprobs.shape != (len(completions),):
            raise ValueError(
                f"base_logprobs must have shape [{len(completions)}], got {tuple(base_logprobs.shape)}"
            )
        scores = self.log_scores(completions, contexts).to(base_logprobs.device)
        return base_logprobs.detach().double() + scores

    def moment_tilts(self) -> list[MomentTilt]:
        """The scorers that have target moments (fitted or not)."""
        return [s for s in self.scorers if isinstance(s, MomentTilt) and s.moments is not None]

    def fit_moments(
        self,
        completions: list[str],
        contexts: list[str] | None,
        base_logprobs: torch.Tensor,
        proposal_logprobs: torch.Tensor | None = None,
        **solver_options: Any,
    ) -> list[MomentFit]:
        """Fit every moment tilt on samples x_j ~ q (q = a when ``proposal_logprobs`` is None).

        Each tilt is fitted with importance weights a * (all other factors) / q, so the moments hold
        under the full hybrid target; with several tilts they are fitted one after another (one
        coordinate-descent sweep: give all moment features to one tilt to fit them jointly).
        """
        log_weights = torch.zeros_like(base_logprobs.detach().double().cpu())  # samples of a: a/q = 1
        if proposal_logprobs is not None:
            log_weights = base_logprobs.detach().double().cpu() - proposal_logprobs.detach().double().cpu()
        tilts = self.moment_tilts()
        results = []
        for tilt in tilts:
            others = [
                s
                for s in self.scorers
                if s is not tilt and not (isinstance(s, MomentTilt) and s.lambdas is None)
            ]
            other_scores = Target(others).log_scores(completions, contexts)
            results.append(tilt.fit(completions, contexts, log_weights + other_scores, **solver_options))
        return results

    def log_z_keys(self, contexts: Sequence[str] | None, count: int) -> list[str | None]:
        """Keys for the log Z estimator (``LogZEstimator``): the contexts if conditional, else None."""
        if not self.conditional:
            return [None] * count
        if contexts is None or len(contexts) != count:
            raise ValueError("a conditional target needs one context per sample to key its log Z_c")
        return list(contexts)

    def __repr__(self) -> str:
        kinds = ", ".join(type(s).__name__ for s in self.scorers)
        return f"Target(a * [{kinds}], conditional={self.conditional})"
