"""An enumerable sequence space where every f-DPG quantity is exact.

Sequences are strings over a few symbols followed by EOS, at most ``max_length`` symbols long (EOS is
then forced, like truncation at ``max_new_tokens`` but with the EOS counted). With 3 symbols and
``max_length=3`` there are 1 + 3 + 9 + 27 = 40 sequences and 13 decision prefixes, so a tabular
autoregressive policy has 13 x 4 logits and pi(x), P(x), Z and every D_f are sums over 40 terms.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

EOS = 0


@dataclass
class ToySpace:
    """All sequences of ``num_symbols`` symbols (token ids 1..num_symbols) of length <= ``max_length``.

    Token 0 is EOS. ``sequences[i]`` holds the ids of sequence i including its final EOS;
    ``texts[i]`` the symbols joined by spaces ("a b"), EOS dropped ("" for the empty sequence).
    ``step_prefix`` / ``step_token`` ([S, max_length + 1], long) list, for each sequence, the decision
    prefix index and the token chosen there; unused slots have prefix -1. The forced EOS after
    ``max_length`` symbols is not a decision.
    """

    num_symbols: int = 3
    max_length: int = 3
    symbols: tuple[str, ...] = ("a", "b", "c", "d", "e", "f")
    sequences: list[tuple[int, ...]] = field(init=False)
    texts: list[str] = field(init=False)
    prefixes: list[tuple[int, ...]] = field(init=False)
    step_prefix: torch.Tensor = field(init=False)
    step_token: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.num_symbols <= len(self.symbols):
            raise ValueError(f"num_symbols must be in [1, {len(self.symbols)}]")
        ids = range(1, self.num_symbols + 1)
        words = [w for n in range(self.max_length + 1) for w in itertools.product(ids, repeat=n)]
        self.prefixes = [w for w in words if len(w) < self.max_length]
        prefix_index = {w: i for i, w in enumerate(self.prefixes)}
        self.sequences = [(*w, EOS) for w in words]
        self.texts = [" ".join(self.symbols[t - 1] for t in w) for w in words]
        steps = self.max_length + 1
        self.step_prefix = torch.full((len(words), steps), -1, dtype=torch.long)
        self.step_token = torch.zeros((len(words), steps), dtype=torch.long)
        for s, w in enumerate(words):
            chosen = (*w, EOS) if len(w) < self.max_length else w
            for i, token in enumerate(chosen):
                self.step_prefix[s, i] = prefix_index[w[:i]]
                self.step_token[s, i] = token

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    def __len__(self) -> int:
        return len(self.sequences)

    def count(self, symbol: str) -> torch.Tensor:
        """Occurrences of ``symbol`` in each sequence: [S] float64."""
        token = self.symbols.index(symbol) + 1
        return torch.tensor([float(seq.count(token)) for seq in self.sequences], dtype=torch.float64)

    def lengths(self) -> torch.Tensor:
        """Number of symbols (EOS excluded) per sequence: [S] float64."""
        return torch.tensor([float(len(seq) - 1) for seq in self.sequences], dtype=torch.float64)


class TabularPolicy(nn.Module):
    """Autoregressive softmax policy with one free logit vector per decision prefix (float64).

    ``logits`` [num_prefixes, vocab_size]; pi(x) = prod over decisions of softmax(logits[prefix])[token].
    """

    def __init__(self, space: ToySpace, logits: torch.Tensor | None = None) -> None:
        super().__init__()
        self.space = space
        shape = (len(space.prefixes), space.vocab_size)
        init = torch.zeros(shape, dtype=torch.float64) if logits is None else logits.to(torch.float64).clone()
        if init.shape != shape:
            raise ValueError(f"logits must have shape {shape}, got {tuple(init.shape)}")
        self.logits = nn.Parameter(init)

    @classmethod
    def random(cls, space: ToySpace, scale: float = 1.0, seed: int = 0) -> TabularPolicy:
        """A policy with i.i.d. N(0, scale^2) logits drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        shape = (len(space.prefixes), space.vocab_size)
        return cls(space, scale * torch.randn(shape, generator=generator, dtype=torch.float64))

    def log_probs(self) -> torch.Tensor:
        """Exact log pi(x) of every sequence: [S] float64, differentiable in ``logits``."""
        return self.log_probs_of(self.logits)

    def log_probs_of(self, logits: torch.Tensor) -> torch.Tensor:
        """log pi(x) of every sequence [S] for given ``logits`` [prefixes, vocab] (pure function)."""
        token_logps = torch.log_softmax(logits, dim=-1)
        used = self.space.step_prefix >= 0
        picked = token_logps[self.space.step_prefix.clamp(min=0), self.space.step_token]
        return torch.where(used, picked, torch.zeros_like(picked)).sum(dim=-1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices of ``num_samples`` i.i.d. sequences x ~ pi: [num_samples] long."""
        probs = torch.exp(self.log_probs().detach())
        return torch.multinomial(probs, num_samples, replacement=True, generator=generator)


@dataclass
class ToyTarget:
    """An unnormalised target over a :class:`ToySpace`: ``log_unnormalized`` [S] float64 (may be -inf)."""

    log_unnormalized: torch.Tensor

    @property
    def log_z(self) -> torch.Tensor:
        """Exact log Z = log sum_x P(x) (0-d float64)."""
        return torch.logsumexp(self.log_unnormalized, dim=0)

    @property
    def log_p(self) -> torch.Tensor:
        """Exact normalised log p(x) = log P(x) - log Z: [S]."""
        return self.log_unnormalized - self.log_z

    @property
    def p(self) -> torch.Tensor:
        return torch.exp(self.log_p)


def reference_f_divergence(
    name: str, pi: torch.Tensor, p: torch.Tensor, alpha: float | None = None
) -> torch.Tensor:
    """Textbook D_f(pi || p) from probability vectors [..., S] (no log-space tricks): a reference
    against which the library's log-space implementation is checked. Differentiable in ``pi``.

    ``p`` may have zeros (0 log 0 = 0); ``pi`` must be positive where a formula divides by it.
    """
    if name == "forward_kl":
        return (torch.xlogy(p, p) - torch.xlogy(p, pi)).sum(-1)
    if name == "reverse_kl":
        return (pi * (torch.log(pi) - torch.log(p))).sum(-1)
    if name == "total_variation":
        return 0.5 * (pi - p).abs().sum(-1)
    if name == "jensen_shannon":
        mixture = 0.5 * (pi + p)
        return (pi * torch.log(pi / mixture)).sum(-1) + torch.xlogy(p, p / mixture).sum(-1)
    if name == "pearson_chi2":
        return ((p - pi) ** 2 / pi).sum(-1)
    if name == "neyman_chi2":
        return ((pi - p) ** 2 / p).sum(-1)
    if name == "alpha":
        if alpha is None:
            raise ValueError("the alpha divergence needs alpha")
        return ((pi**alpha * p ** (1 - alpha)).sum(-1) - 1) / (alpha * (alpha - 1))
    raise ValueError(f"no reference formula for {name!r}")
