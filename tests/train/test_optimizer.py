"""The engine's AdamW: fused where torch supports it, and the same update as the reference AdamW."""

from __future__ import annotations

import torch

from distalign.config import TrainConfig
from distalign.train.optim import build_adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((5, 3), (7,))]


def test_build_adamw_is_fused_on_cpu_float32():
    optimizer = build_adamw(_params(0), TrainConfig())
    assert optimizer.defaults["fused"] is True


def test_fused_adamw_steps_like_the_single_tensor_implementation():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, adam_betas=(0.8, 0.95))
    ours, reference = _params(0), _params(0)
    fused = build_adamw(ours, cfg)
    plain = torch.optim.AdamW(reference, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours, reference):
            grad = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    for a, b, initial in zip(ours, reference, _params(0)):
        assert not torch.allclose(a, initial)  # the parameters moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
