"""The fused output-head log-probs: values and gradients equal the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch

from distalign.models.fused_head import LogitTransform, fused_head_logprobs

N, H, V = 11, 6, 17


def _inputs(dtype=torch.float64, bias: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=generator, dtype=dtype) * 2)
        if bias:
            head.bias.copy_(torch.randn(V, generator=generator, dtype=dtype))
    features = torch.randn(N, H, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=generator)
    return features, head, targets


def _naive(features, head, targets, transform):
    logits = head(features).to(torch.promote_types(features.dtype, torch.float32))
    logits = transform(logits) if transform is not None else logits
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


TRANSFORMS = {
    "none": None,
    "scale": LogitTransform(scale=0.3),
    "softcap": LogitTransform(softcap=2.5),
    "scale+softcap": LogitTransform(scale=1.7, softcap=3.0),
}


@pytest.mark.parametrize("chunk_size", [1, 4, N, N + 5])
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_naive_computation_in_float64(chunk_size, transform, bias):
    features, head, targets = _inputs(bias=bias)
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [features, head.weight] + ([head.bias] if bias else [])
    fused = fused_head_logprobs(features, head, targets, TRANSFORMS[transform], chunk_size)
    naive = _naive(features, head, targets, TRANSFORMS[transform])
    torch.testing.assert_close(fused, naive, rtol=1e-13, atol=1e-13)
    got = torch.autograd.grad((fused * upstream).sum(), params)
    want = torch.autograd.grad((naive * upstream).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_against_finite_differences():
    features, head, targets = _inputs()
    transform = TRANSFORMS["scale+softcap"]

    def function(f, w, b):
        from distalign.models.fused_head import FusedHeadLogprobs

        return FusedHeadLogprobs.apply(f, w, b, targets, transform, 4)

    assert torch.autograd.gradcheck(function, (features, head.weight, head.bias))


def test_tied_embeddings_collect_both_gradients():
    """The head's weight is the input embedding: the gradient through the head adds to the embedding's."""
    features, head, targets = _inputs(bias=False)
    embedding = head.weight
    tokens = torch.tensor([1, 4, 4, 9])
    hidden = lambda: features + embedding[tokens].sum(0)  # noqa: E731  (the embedding feeds the features too)
    naive = _naive(hidden(), head, targets, None).sum()
    (want,) = torch.autograd.grad(naive, embedding)
    fused = fused_head_logprobs(hidden(), head, targets, None, 3).sum()
    (got,) = torch.autograd.grad(fused, embedding)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_block_of_vocabulary_size_is_kept_for_backward():
    features, head, targets = _inputs(dtype=torch.float32)
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fused_head_logprobs(features, head, targets, TRANSFORMS["softcap"], 4).sum().backward()
    assert not [shape for shape in saved if len(shape) == 2 and shape[-1] == V]  # no [rows, V] logits
    assert torch.Size([N, H]) in saved and torch.Size([V, H]) in saved


def test_bfloat16_matches_autograd_through_the_same_bfloat16_head():
    """In bf16 the fused path does what autograd does through the bf16 head (bf16 matmuls, float32
    softmax), up to accumulation order; log-probs come out in float32."""
    features, head, targets = _inputs(dtype=torch.bfloat16)
    fused = fused_head_logprobs(features, head, targets, None, 4)
    naive = _naive(features, head, targets, None)
    assert fused.dtype == naive.dtype == torch.float32
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    params = (features, head.weight, head.bias)
    for got, want in zip(torch.autograd.grad(fused.sum(), params), torch.autograd.grad(naive.sum(), params)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_empty_input_gives_an_empty_result():
    features, head, targets = _inputs()
    out = fused_head_logprobs(features[:0], head, targets[:0], None, 4)
    assert out.shape == (0,)


def _matmul_dtypes_in_backward(loss: torch.Tensor) -> list[torch.dtype]:
    """The input dtypes of every matrix product run by ``loss.backward()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}
    seen: list[torch.dtype] = []

    class RecordMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            return func(*args, **(kwargs or {}))

    with RecordMatmuls():
        loss.backward()
    return seen


def test_under_autocast_the_gradient_matmuls_run_in_the_autocast_dtype_like_autograd():
    """float32 weights under bf16 autocast (mixed-precision training): backward's matmuls run in bf16,
    as autograd's backward of the autocast linear does (float32 ones take a GPU's slow path), and the
    gradients match autograd's through the autocast head to bf16 precision, in float32."""
    features, head, targets = _inputs(dtype=torch.float32)
    features.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_head_logprobs(features, head, targets, None, 4)
        naive = _naive(features, head, targets, None)
    torch.testing.assert_close(fused, naive.float(), rtol=1e-5, atol=1e-5)
    dtypes = _matmul_dtypes_in_backward(fused.sum())
    assert dtypes and set(dtypes) == {torch.bfloat16}
    got = [t.grad.clone() for t in (features, head.weight, head.bias)]
    for t in (features, head.weight, head.bias):
        t.grad = None
    naive.float().sum().backward()
    for mine, autograds in zip(got, (features.grad, head.weight.grad, head.bias.grad)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, autograds, rtol=2e-2, atol=2e-2)


def test_without_autocast_float32_gradients_stay_float32():
    features, head, targets = _inputs(dtype=torch.float32)
    assert set(_matmul_dtypes_in_backward(fused_head_logprobs(features, head, targets, None, 4).sum())) == {
        torch.float32
    }
