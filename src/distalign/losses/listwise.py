"""Listwise preference losses: a prompt with K scored responses, scored in one forward.

Plackett-Luce DPO (Rafailov et al. 2023, DPO Appendix A.3): the ranking of the responses by their
scores is modelled as Plackett-Luce over the implicit rewards ``beta * rho_k``
(``rho = log pi - log pi_ref``), whose negative log-likelihood is

    -sum_{k=1..K} [ beta rho_(k) - log sum_{j >= k} exp(beta rho_(j)) ]

with ``(k)`` the k-th best response. With K = 2 it is the DPO loss.
"""

from __future__ import annotations

import torch

from distalign.losses.base import ListwiseStats, PerExampleLosses, check_positive, register_loss


def plackett_luce_loss(
    logratios: torch.Tensor, scores: torch.Tensor, present: torch.Tensor, *, beta: float = 0.1
) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of the score ranking, per row.

    Args:
        logratios: [N, K] ``rho`` in nats (anything on padding).
        scores: [N, K] the data's scores, higher is better; equal scores keep the responses' order.
        present: [N, K] 1 for a real response, 0 for padding (each row needs at least one).
        beta: KL-regularisation strength (> 0).

    Returns:
        [N] per-row loss in nats (0 for a row with one response).
    """
    check_positive("beta", beta)
    present = present.bool()
    ranking_key = torch.where(
        present, scores.to(torch.float64), torch.full_like(scores, -torch.inf, dtype=torch.float64)
    )
    order = torch.argsort(ranking_key, dim=-1, descending=True, stable=True)  # padding last
    ranked = torch.gather(beta * logratios, -1, order)
    ranked_present = torch.gather(present, -1, order)
    ranked = torch.where(ranked_present, ranked, torch.full_like(ranked, -torch.inf))
    # log sum_{j >= k} exp(r_j): a reversed cumulative log-sum-exp (padding, at the end, adds nothing).
    tail_lse = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(ranked_present, ranked - tail_lse, torch.zeros_like(ranked))
    return -terms.sum(-1)


@register_loss(
    "plackett_luce",
    data_kind="listwise",
    needs_reference=True,
    paper="Rafailov et al. 2023, DPO Appendix A.3 (Plackett-Luce ranking model)",
)
def plackett_luce_per_example(stats: ListwiseStats, *, beta: float = 0.1) -> PerExampleLosses:
    """Plackett-Luce DPO per listwise row (:func:`plackett_luce_loss`) on summed log-ratios.

    Metrics: ``rewards/best`` and ``rewards/worst`` (mean implicit reward ``beta * rho`` of each row's
    highest- and lowest-scored response), ``rewards/margins`` their difference, and
    ``rewards/accuracies``: the fraction of response pairs with different scores whose implicit
    rewards are ordered like the scores.
    """
    if stats.ref_logps is None:
        raise ValueError("loss 'plackett_luce' needs reference log-probs (ref_logps)")
    logratios = stats.policy_logps - stats.ref_logps
    losses = plackett_luce_loss(logratios, stats.scores, stats.present, beta=beta)
    with torch.no_grad():
        rewards = beta * logratios.detach().double()
        present = stats.present.bool()
        scores = stats.scores.double()
        best = torch.where(present, scores, torch.full_like(scores, -torch.inf)).argmax(-1, keepdim=True)
        worst = torch.where(present, scores, torch.full_like(scores, torch.inf)).argmin(-1, keepdim=True)
        best_reward, worst_reward = rewards.gather(-1, best).mean(), rewards.gather(-1, worst).mean()
        both = present[:, :, None] & present[:, None, :]
        ordered_pairs = both & (scores[:, :, None] > scores[:, None, :])
        agree = ordered_pairs & (rewards[:, :, None] > rewards[:, None, :])
        metrics = {
            "rewards/best": best_reward.float(),
            "rewards/worst": worst_reward.float(),
            "rewards/margins": (best_reward - worst_reward).float(),
            "rewards/accuracies": (agree.sum() / ordered_pairs.sum().clamp(min=1)).float(),
        }
    return PerExampleLosses(losses, metrics)
