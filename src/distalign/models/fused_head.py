"""Token log-probs through a linear output head with a hand-written backward, one [chunk, V] block at a time.

``log p(y_t) = s(z)[y_t] - logsumexp(s(z))`` with logits ``z = W h + b`` and ``s`` the architecture's
logit transform (a scale, then an optional ``c tanh(. / c)`` soft-cap). Under ``torch.utils.checkpoint``
each chunk's backward re-runs the forward and then autograd's own backward of the cast, the transform,
``logsumexp`` and ``gather``: several extra passes over a [chunk, V] block. :class:`FusedHeadLogprobs`
saves only the features and one log-normaliser per token, and its backward recomputes the chunk's
logits once and writes the gradients directly:

    dL/dz = g * (onehot(y) - softmax(s(z))) * s'(z),   dL/dh = dL/dz W,   dL/dW += dL/dz^T h,   dL/db += sum dL/dz

Values and gradients equal the naive full-logits computation (float64 tests in
tests/models/test_fused_head.py); peak extra memory stays one [chunk, V] block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class LogitTransform:
    """``s(z) = softcap * tanh(scale * z / softcap)`` (no tanh when ``softcap`` is None): Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling`` and Gemma's ``final_logit_softcapping``."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        scaled = logits * self.scale if self.scale != 1 else logits
        return torch.tanh(scaled / self.softcap) * self.softcap if self.softcap else scaled

    def derivative(self, logits: Tensor) -> Tensor | float:
        """``s'(z)``: a constant for a pure scale, ``scale (1 - tanh^2)`` with the soft-cap."""
        if not self.softcap:
            return self.scale
        return self.scale * (1 - torch.tanh(logits * self.scale / self.softcap).square())


def _chunk_logits(features: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    return F.linear(features.to(weight.dtype), weight, bias).to(dtype)


def _autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    """The ambient autocast settings, so backward recomputes the logits exactly as forward did."""
    try:
        return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)
    except (AttributeError, TypeError):  # torch < 2.4: only the CUDA flag is queryable
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
        return device_type, torch.get_autocast_gpu_dtype() if enabled else torch.float32, enabled


class FusedHeadLogprobs(torch.autograd.Function):
    """``apply(features [N, H], weight [V, H], bias [V] | None, targets [N], transform, chunk_size)``
    -> [N] token log-probs in float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, transform, chunk_size):  # noqa: D102
        dtype = torch.promote_types(weight.dtype, torch.float32)
        logprobs = features.new_empty(features.shape[0], dtype=dtype)
        normalisers = torch.empty_like(logprobs)
        for start in range(0, features.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(features[rows], weight, bias, dtype)
            logits = transform(logits) if transform is not None else logits
            normalisers[rows] = torch.logsumexp(logits, dim=-1)
            logprobs[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - normalisers[rows]
        ctx.save_for_backward(features, weight, bias, targets, normalisers)
        ctx.transform, ctx.chunk_size = transform, chunk_size
        ctx.autocast = _autocast_state(features.device.type)
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs):  # noqa: D102
        features, weight, bias, targets, normalisers = ctx.saved_tensors
        transform, chunk_size = ctx.transform, ctx.chunk_size
        need_features, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = normalisers.dtype
        grad_features = torch.empty_like(features) if need_features else None
        # Accumulated over chunks in at least float32, cast to the parameter dtype once at the end.
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias and bias is not None else None
        device_type, autocast_dtype, autocast_enabled = ctx.autocast
        # The two gradient matmuls run in the dtype autograd would use: under autocast the forward's
        # matmul ran in the autocast dtype, and autograd's backward of it does too (then casts the
        # weight gradient up). Doing them in float32 instead ran them on a GPU's slow non-tensor-core
        # path: ~23% of an H200's busy time in a Qwen2-0.5B DPO step (benchmarks/profile_step.py).
        matmul_dtype = autocast_dtype if autocast_enabled else weight.dtype
        matmul_weight = weight.to(matmul_dtype)
        for start in range(0, features.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                logits = _chunk_logits(features[rows], weight, bias, dtype)
            slope = transform.derivative(logits) if transform is not None else None
            transformed = transform(logits) if transform is not None else logits
            grad = grad_logprobs[rows, None].to(dtype)
            # In place on the chunk's own buffer: softmax = exp(s(z) - lse), then -g softmax + g onehot.
            grad_logits = transformed.sub_(normalisers[rows, None]).exp_().mul_(-grad)
            grad_logits.scatter_add_(-1, targets[rows, None], grad)
            if slope is not None:
                grad_logits.mul_(slope)
            grad_for_matmul = grad_logits.to(matmul_dtype)
            chunk_features = features[rows].to(matmul_dtype)
            if grad_features is not None:
                grad_features[rows] = (grad_for_matmul @ matmul_weight).to(features.dtype)
            if grad_weight is not None and grad_weight.dtype == matmul_dtype:
                grad_weight.addmm_(grad_for_matmul.T, chunk_features)  # no [V, H] temporary
            elif grad_weight is not None:  # add_ converts while adding: no float32 [V, H] temporary
                grad_weight.add_(grad_for_matmul.T @ chunk_features)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_features,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )


def fused_head_logprobs(
    features: Tensor,
    head: torch.nn.Linear,
    targets: Tensor,
    transform: LogitTransform | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """[N] log-probs of ``targets`` [N] under ``transform(head(features))``, features [N, H]."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return FusedHeadLogprobs.apply(features, head.weight, head.bias, targets, transform, chunk_size)
