"""Memory-lean sequence log-probs against a naive float64 reference, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from distalign_testing.naive_logprobs import naive_sequence_logprobs
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

import distalign.models.token_logprobs as logprobs_module
from distalign.models.loading import LoraSettings, apply_lora
from distalign.models.logprobs import SequenceLogprobModel, split_pairs
from distalign.models.token_logprobs import lean_path_supported, sequence_logprobs

VOCAB = 512
# Completion lengths 5, 9, 1, 7 with chunk sizes 3 and 7 put chunk boundaries inside sequences.
PROMPTS, COMPLETIONS = [3, 6, 2, 4], [5, 9, 1, 7]


def hand_computed_logprobs(model, batch) -> torch.Tensor:
    """One sequence at a time, unpadded, summing log p(token | prefix) with explicit loops."""
    totals = []
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :length][None]
        logits = model(input_ids=ids).logits[0].double()
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, length):
            if batch["completion_mask"][row, t]:
                total = total + logits[t - 1, ids[0, t]] - torch.logsumexp(logits[t - 1], dim=-1)
        totals.append(total)
    return torch.stack(totals)


def test_naive_reference_matches_hand_computation(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    summed, counts = naive_sequence_logprobs(model, **batch)
    torch.testing.assert_close(summed, hand_computed_logprobs(model, batch), atol=1e-5, rtol=0)
    assert counts.tolist() == [float(c) for c in COMPLETIONS]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_lean_equals_naive(tiny_model_factory, batch_factory, chunk_size):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, naive_counts = naive_sequence_logprobs(model, **batch)
    lean = sequence_logprobs(model, **batch, chunk_size=chunk_size)
    assert lean.summed.dtype == torch.float32 and lean.summed.shape == (4,)
    torch.testing.assert_close(lean.summed.double(), naive_summed, atol=1e-5, rtol=1e-7)
    torch.testing.assert_close(lean.counts.double(), naive_counts)
    torch.testing.assert_close(lean.mean.double(), naive_summed / naive_counts, atol=1e-6, rtol=0)


def test_lean_equals_naive_in_float64(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory(dtype=torch.float64)
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    lean = sequence_logprobs(model, **batch, chunk_size=3)
    assert lean.summed.dtype == torch.float64
    torch.testing.assert_close(lean.summed, naive_summed, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_gradients_equal_naive(tiny_model_factory, batch_factory, chunk_size):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25])  # distinct weights so per-row mistakes show

    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    (naive_summed.float() * weights).sum().backward()
    naive_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    lean = sequence_logprobs(model, **batch, chunk_size=chunk_size)
    (lean.summed * weights).sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, naive_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_with_activation_checkpointing_match(tiny_model_factory, batch_factory):
    batch = batch_factory(PROMPTS, COMPLETIONS)
    grads = []
    for checkpointed in (False, True):
        model, _ = tiny_model_factory()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        sequence_logprobs(model, **batch, chunk_size=4).summed.sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-5)


def test_bfloat16_model_accumulates_in_float32(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory(dtype=torch.bfloat16)
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    lean = sequence_logprobs(model, **batch, chunk_size=3)
    assert lean.summed.dtype == torch.float32
    # both score the same bf16 logits; only the float32 vs float64 reduction differs
    torch.testing.assert_close(lean.summed.double(), naive_summed, atol=1e-4, rtol=1e-5)


def test_padding_side_does_not_change_logprobs(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    right = batch_factory([3], [5])
    length = 8
    width = right["input_ids"].shape[1]
    left = {key: torch.roll(value, shifts=width - length, dims=1) for key, value in right.items()}
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
    torch.testing.assert_close(
        sequence_logprobs(model, **left).summed, sequence_logprobs(model, **right).summed, atol=1e-5, rtol=0
    )


def test_rows_are_independent_of_batch_companions(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    together = sequence_logprobs(model, **batch, chunk_size=4).summed
    for row in range(4):
        alone = sequence_logprobs(model, **{k: v[row : row + 1] for k, v in batch.items()}).summed
        torch.testing.assert_close(alone[0], together[row], atol=1e-5, rtol=0)


def test_lora_model_equals_naive(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # trained-looking adapters, so the LoRA path actually contributes
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(peft_model, **batch)
    lean = sequence_logprobs(peft_model, **batch, chunk_size=5)
    torch.testing.assert_close(lean.summed.double(), naive_summed, atol=1e-5, rtol=1e-7)
    lean.summed.sum().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_backward", "checkpointed_chunks"])
def test_lean_path_never_materialises_full_vocab_logits(
    tiny_model_factory, batch_factory, monkeypatch, fused
):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    chunk_size, total_completion = 3, sum(COMPLETIONS)
    head_outputs: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_outputs.append(tuple(output.shape)))

    def saved_vocab_tensors(control: bool) -> list[tuple[int, ...]]:
        if not fused:  # the head as a wrapped module would be: chunks under torch.utils.checkpoint
            monkeypatch.setattr(logprobs_module, "_can_fuse", lambda head: False)
        if control:  # the control: same chunking, logits kept for backward
            monkeypatch.setattr(logprobs_module, "_can_fuse", lambda head: False)
            monkeypatch.setattr(logprobs_module, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
        saved: list[tuple[int, ...]] = []

        def pack(tensor):
            if tensor.dim() >= 2 and tensor.shape[-1] == VOCAB:
                saved.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = sequence_logprobs(model, **batch, chunk_size=chunk_size)
        result.summed.sum().backward()
        monkeypatch.undo()
        return saved

    assert saved_vocab_tensors(control=False) == []
    if not fused:  # the fused function reads the head's weight directly, so no module hook fires
        forward_calls = math.ceil(total_completion / chunk_size)
        assert len(head_outputs) == 2 * forward_calls  # each chunk once forward, once recomputed in backward
        assert all(shape[0] <= chunk_size and len(shape) == 2 for shape in head_outputs)
    # Without checkpointing the same hooks do see [chunk, V] tensors: the check above can fail.
    assert saved_vocab_tensors(control=True)


def test_chunk_memory_bound_under_no_grad(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    shapes: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    with torch.no_grad():
        sequence_logprobs(model, **batch_factory(PROMPTS, COMPLETIONS), chunk_size=4)
    assert max(shape[0] for shape in shapes) == 4 and len(shapes) == math.ceil(sum(COMPLETIONS) / 4)


def test_full_logits_fallback_equals_naive(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    fallback = sequence_logprobs(model, **batch, chunk_size=3, lean=False)
    torch.testing.assert_close(fallback.summed.double(), naive_summed, atol=1e-5, rtol=1e-7)


class _ScaledHeadLlama(LlamaForCausalLM):
    """Post-processes logits in forward in a way the lean path does not know about."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output


def test_unknown_logit_postprocessing_falls_back_to_full_logits(tiny_model_factory, batch_factory):
    plain, _ = tiny_model_factory()
    model = _ScaledHeadLlama(plain.config)
    model.load_state_dict(plain.state_dict())
    model.config.model_type = "scaled_llama"  # not on the known-plain list, so it gets probed
    assert lean_path_supported(model) is False
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    torch.testing.assert_close(
        sequence_logprobs(model, **batch).summed.double(), naive_summed, atol=1e-5, rtol=1e-7
    )


def test_softcapped_architecture_uses_lean_path_exactly(batch_factory):
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=5.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits well beyond the cap, so a missing tanh would show
    assert lean_path_supported(model) is True
    batch = batch_factory(PROMPTS, COMPLETIONS)
    naive_summed, _ = naive_sequence_logprobs(model, **batch)
    lean = sequence_logprobs(model, **batch, chunk_size=3)
    torch.testing.assert_close(lean.summed.double(), naive_summed, atol=1e-5, rtol=1e-7)
    uncapped = model.lm_head(model.get_decoder()(**{k: batch[k] for k in ("input_ids", "attention_mask")})[0])
    assert uncapped.abs().max() > 10  # the cap was really active


def test_sequence_logprob_model_forward(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    wrapper = SequenceLogprobModel(model, chunk_size=3)
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in model.parameters()}
    batch = batch_factory(PROMPTS, COMPLETIONS)
    summed, counts = wrapper(**batch)
    expected = sequence_logprobs(model, **batch)
    torch.testing.assert_close(summed, expected.summed)
    torch.testing.assert_close(counts, expected.counts)


def test_sequence_logprob_model_under_ddp(tiny_model_factory, batch_factory, tmp_path):
    """A world-size-1 gloo DDP: the wrapper's forward is what DDP sees, and gradients arrive."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _ = tiny_model_factory()
        ddp = DistributedDataParallel(SequenceLogprobModel(model, chunk_size=4))
        batch = batch_factory(PROMPTS, COMPLETIONS)
        summed, _ = ddp(**batch)
        summed.sum().backward()
        naive_summed, _ = naive_sequence_logprobs(model, **batch)
        torch.testing.assert_close(summed.double(), naive_summed, atol=1e-5, rtol=1e-7)
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_invalid_masks_are_rejected(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batch = batch_factory([2], [3])
    first_token = dict(batch, completion_mask=batch["completion_mask"].clone())
    first_token["completion_mask"][0, 0] = 1
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logprobs(model, **first_token)
    on_padding = dict(batch, completion_mask=batch["completion_mask"].clone())
    on_padding["completion_mask"][0, -1] = 1
    with pytest.raises(ValueError, match="attended"):
        sequence_logprobs(model, **on_padding)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(model, **batch, chunk_size=0)


def test_row_without_completion_scores_zero(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batch = batch_factory([4, 3], [0, 2])
    result = sequence_logprobs(model, **batch)
    assert result.summed[0] == 0 and result.counts[0] == 0 and result.mean[0] == 0
    assert result.summed[1] < 0


def test_split_pairs():
    chosen, rejected = split_pairs(torch.arange(6))
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5]
    with pytest.raises(ValueError):
        split_pairs(torch.arange(5))
