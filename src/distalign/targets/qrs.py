"""Quasi-rejection sampling (Eikema, Kruszewski, Dance, Dymetman, Aziz, "An approximate sampler for
energy-based models with divergence diagnostics", TMLR 2022).

Draw x ~ q and accept it with probability min(1, P(x) / (beta q(x))). Accepted samples follow

    p_beta(x) = min(P(x), beta q(x)) / Z_beta,   Z_beta = E_q[min(P/q, beta)] = beta * acceptance_rate,

which is the target p = P/Z exactly once beta >= max_x P(x)/q(x) (then QRS is rejection sampling) and
moves towards q as beta shrinks; the acceptance rate E_q[min(1, P/(beta q))] falls as beta grows.
:func:`qrs_diagnostics` estimates, from one set of proposal samples, the acceptance rate and
TV(p_beta, p) for a grid of beta, so beta can be chosen for a given cost / fidelity trade-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distalign.models.sampling import sample_completions, score_completions
from distalign.targets.estimators import log_mean_exp
from distalign.targets.target import Target

#: ``propose(n) -> (items [n], log P [n], log q [n])``: n fresh samples from q with their log-masses.
Proposer = Callable[[int], tuple[Sequence[Any], torch.Tensor, torch.Tensor]]


def qrs_acceptance_probabilities(
    target_log_unnormalized: torch.Tensor, proposal_logps: torch.Tensor, log_beta: float | torch.Tensor
) -> torch.Tensor:
    """min(1, P / (beta q)) per sample: [N] float64 (broadcasts against a [B, 1] ``log_beta``)."""
    log_ratio = (
        target_log_unnormalized.double()
        - proposal_logps.double()
        - torch.as_tensor(log_beta, dtype=torch.float64)
    )
    return torch.exp(torch.clamp(log_ratio, max=0.0))


@dataclass
class QRSResult:
    """Accepted samples (at most ``num_samples``) with their log P and log q, and the run's statistics."""

    samples: list[Any]
    target_log_unnormalized: torch.Tensor
    proposal_logps: torch.Tensor
    num_proposals: int
    num_accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / max(self.num_proposals, 1)


def qrs_sample(
    propose: Proposer,
    *,
    log_beta: float,
    num_samples: int,
    batch_size: int = 64,
    max_proposals: int = 100_000,
    generator: torch.Generator | None = None,
) -> QRSResult:
    """Sample p_beta by QRS: draw batches from ``propose`` until ``num_samples`` are accepted.

    Stops early after ``max_proposals`` draws (the result then holds fewer samples; check
    ``len(result.samples)``). ``generator`` drives the accept/reject coin flips only.
    """
    accepted: list[Any] = []
    log_targets: list[torch.Tensor] = []
    log_proposals: list[torch.Tensor] = []
    num_proposals = num_accepted = 0
    while num_accepted < num_samples and num_proposals < max_proposals:
        count = min(batch_size, max_proposals - num_proposals)
        items, log_target, log_proposal = propose(count)
        if len(items) != count or log_target.shape != (count,) or log_proposal.shape != (count,):
            raise ValueError(f"propose({count}) must return {count} items and two [{count}] tensors")
        uniform = torch.rand(count, generator=generator, dtype=torch.float64)
        keep = uniform < qrs_acceptance_probabilities(log_target.cpu(), log_proposal.cpu(), log_beta)
        index = keep.nonzero().flatten().tolist()
        accepted += [items[i] for i in index]
        log_targets.append(log_target.detach().cpu()[keep])
        log_proposals.append(log_proposal.detach().cpu()[keep])
        num_proposals += count
        num_accepted += len(index)
    return QRSResult(
        samples=accepted[:num_samples],
        target_log_unnormalized=torch.cat(log_targets)[:num_samples] if log_targets else torch.zeros(0),
        proposal_logps=torch.cat(log_proposals)[:num_samples] if log_proposals else torch.zeros(0),
        num_proposals=num_proposals,
        num_accepted=num_accepted,
    )


def qrs_diagnostics(
    target_log_unnormalized: torch.Tensor,
    proposal_logps: torch.Tensor,
    log_betas: torch.Tensor | Sequence[float],
) -> dict[str, torch.Tensor]:
    """Acceptance rate and TV(p_beta, p) for each beta, estimated from samples x_j ~ q.

    ``target_log_unnormalized``, ``proposal_logps`` [N]; ``log_betas`` [B]. Returns float64 tensors:
    ``acceptance_rate`` [B] = mean_j min(1, w_j / beta) with w = P/q, and ``tv_to_target`` [B] =
    0.5 mean_j |w_j / Z_hat - min(w_j, beta) / Z_beta_hat| with Z_hat = mean w,
    Z_beta_hat = mean min(w, beta) (self-normalised, consistent as N grows).
    """
    log_w = (target_log_unnormalized.double() - proposal_logps.double()).cpu()
    log_betas = torch.as_tensor(log_betas, dtype=torch.float64).reshape(-1, 1)
    log_capped = torch.minimum(log_w[None, :], log_betas)  # log min(w, beta): [B, N]
    acceptance = torch.exp(log_capped - log_betas).mean(dim=1)
    log_z = log_mean_exp(log_w)
    log_z_beta = log_mean_exp(log_capped, dim=1)[:, None]
    tv = 0.5 * (torch.exp(log_w - log_z)[None, :] - torch.exp(log_capped - log_z_beta)).abs().mean(dim=1)
    return {"log_beta": log_betas.flatten(), "acceptance_rate": acceptance, "tv_to_target": tv}


def log_beta_for_acceptance_rate(
    target_log_unnormalized: torch.Tensor,
    proposal_logps: torch.Tensor,
    acceptance_rate: float,
    iterations: int = 100,
) -> float:
    """The log beta at which the estimated acceptance rate equals ``acceptance_rate`` (bisection).

    The rate decreases monotonically in beta, from 1 at beta <= min w to mean(w)/beta for beta >= max w.
    """
    if not 0 < acceptance_rate <= 1:
        raise ValueError(f"acceptance_rate={acceptance_rate} must be in (0, 1]")
    log_w = (target_log_unnormalized.double() - proposal_logps.double()).cpu()
    finite = log_w[torch.isfinite(log_w)]
    if finite.numel() == 0:
        raise ValueError("every sample has P = 0: no beta gives a positive acceptance rate")
    low, high = float(finite.min()) - 1.0, float(finite.max()) - math.log(acceptance_rate) + 1.0

    def rate(log_beta: float) -> float:
        return float(
            qrs_diagnostics(target_log_unnormalized, proposal_logps, [log_beta])["acceptance_rate"][0]
        )

    for _ in range(iterations):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rate(middle) > acceptance_rate else (low, middle)
    return 0.5 * (low + high)


def lm_proposer(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    target: Target,
    *,
    base_model: torch.nn.Module | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> Proposer:
    """A :data:`Proposer` drawing completions of one rendered ``prompt`` from ``model`` (q).

    Items are ``(completion_ids, completion_text)``. log P = log a + the target's log-scores, with
    log a teacher-forced under ``base_model`` (``None``: the proposal is the base model, log a = log q).
    Completions cut at ``max_new_tokens`` carry prefix log-probs (see ``Samples``); give enough room.
    """

    def propose(count: int) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        samples = sample_completions(
            model,
            tokenizer,
            [prompt],
            num_samples=count,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generator=generator,
        )
        log_q = samples.logprobs.double()
        log_a = log_q
        if base_model is not None:
            log_a = score_completions(
                base_model, tokenizer, samples.prompts, samples.completion_ids, batch_size
            )
        log_target = target.log_unnormalized(log_a.double(), samples.completion_texts, samples.prompts)
        return list(zip(samples.completion_ids, samples.completion_texts)), log_target, log_q

    return propose
