"""Span attention (distalign.models.span_attention): a packed row's attention as one causal call per
span, equal to the block-diagonal mask's; the switched model is transformers' SDPA model otherwise.
(Log-probs and gradients of whole packed batches against padded ones: tests/train/test_packing.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import distalign.models.packed_logprobs as packed_logprobs_module
from distalign.config import load_config
from distalign.data.collate import PackingLayout, collate_sequences, pack_sequences, packed_attention_mask
from distalign.models.logprobs import SequenceLogprobModel, batch_logprobs
from distalign.models.packed_logprobs import packed_attention_kind, packed_sequence_logprobs
from distalign.models.span_attention import (
    IMPLEMENTATION,
    Span,
    attention_spans,
    packed_block_mask,
    span_attention_forward,
    use_span_attention,
)
from distalign.models.tiny import build_tiny_model
from distalign.models.token_logprobs import sequence_logprobs
from distalign.train.setup import load_policy, packing_layout


def test_spans_of_a_hand_built_shared_layout():
    # a pair sharing prompt [1, 2] (chosen [5, 6], rejected [8]) and a sequence of its own, padded
    batch = pack_sequences([[1, 2], [3], [1, 2]], [[5, 6], [7], [8]], 0, rows="shared")
    spans = attention_spans(batch["sequence_index"], batch["group_index"], batch["completion_mask"])
    assert spans == (
        (Span(0, 4), Span(4, 5, prefix_start=0, prefix_end=2)),  # prompt + chosen; rejected sees the prompt
        (Span(0, 2), Span(2, 5)),  # the lone sequence; the row-end padding is a block of its own
    )


def test_spans_of_one_shared_row():
    batch = pack_sequences([[1, 2], [3], [1, 2]], [[5, 6], [7], [8]], 0, rows="shared_one")
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6, 8, 3, 7]]  # no padding
    spans = attention_spans(batch["sequence_index"], batch["group_index"], batch["completion_mask"])
    assert spans == ((Span(0, 4), Span(4, 5, prefix_start=0, prefix_end=2), Span(5, 7)),)


def test_spans_of_a_hand_built_longest_layout():
    batch = pack_sequences([[1, 2], [3], [4]], [[5, 6, 7], [8], [9, 10]], 0)
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 0], [2, 2, 2, 1, 1]]
    assert attention_spans(batch["sequence_index"]) == ((Span(0, 5),), (Span(0, 3), Span(3, 5)))


def test_a_run_that_is_not_a_completion_after_a_shared_prompt_is_refused():
    sequence_index = torch.tensor([[0, 0, 1, 1]])
    group_index = torch.tensor([[0, 0, 0, 0]])
    completion_mask = torch.tensor([[0, 1, 0, 1]])  # the second run starts with a prompt token
    with pytest.raises(ValueError, match="not one completion after a prompt"):
        attention_spans(sequence_index, group_index, completion_mask)


def _attention_inputs(seed: int, heads: int = 4, kv_heads: int = 2, width: int = 9):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, width, 8, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(2, kv_heads, width, 8, generator=generator, dtype=torch.float64) for _ in "kv")
    return query, key, value


def test_span_attention_equals_the_masked_attention_with_grouped_query_heads():
    batch = pack_sequences([[1, 2, 3], [4], [1, 2, 3], [5, 6]], [[7, 8], [9, 1], [2], [3]], 0, rows="shared")
    width = batch["input_ids"].shape[1]
    query, key, value = _attention_inputs(0, width=width)
    spans = attention_spans(batch["sequence_index"], batch["group_index"], batch["completion_mask"])
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, _ = span_attention_forward(module, query, key, value, None, scaling=0.3, distalign_spans=spans)
    mask = packed_attention_mask(
        batch["sequence_index"], group_index=batch["group_index"], completion_mask=batch["completion_mask"]
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=0)


def _gqa_model() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double()


def test_a_packed_grouped_query_model_gives_the_padded_logprobs_and_gradients(float64_norms):
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10], [11, 12, 13]]
    completions = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [30, 31]]
    model = _gqa_model()
    padded = collate_sequences(prompts, completions, 0)
    reference = sequence_logprobs(
        model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"]
    )
    reference.summed.sum().backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    assert use_span_attention(model) and packed_attention_kind(model) == "spans"
    for rows in ("longest", "shared", "one", "shared_one"):
        model.zero_grad()
        packed = pack_sequences(prompts, completions, 0, rows=rows)
        result = packed_sequence_logprobs(
            model, *(packed[k] for k in ("input_ids", "position_ids", "sequence_index", "completion_mask")),
            group_index=packed.get("group_index"),
        )  # fmt: skip
        torch.testing.assert_close(result.summed, reference.summed, atol=1e-12, rtol=0)
        result.summed.sum().backward()
        for grad, expected in zip((p.grad for p in model.parameters()), padded_grads, strict=True):
            torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_without_spans_the_switched_model_is_the_sdpa_model(tmp_path):
    model, _ = build_tiny_model(seed=0)
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    attention_mask = (input_ids != 0).long()
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert use_span_attention(model)
    assert model.config._attn_implementation == IMPLEMENTATION
    after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(before, after)
    generated = model.generate(input_ids[1:], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)
    model.save_pretrained(tmp_path)  # the implementation is a run-time choice, not saved
    assert IMPLEMENTATION not in (tmp_path / "config.json").read_text()


def test_eager_models_are_left_alone():
    model, _ = build_tiny_model(seed=0)
    model.set_attn_implementation("eager")
    assert not use_span_attention(model)
    assert model.config._attn_implementation == "eager" and packed_attention_kind(model) == "mask"


def test_a_packed_run_loads_its_sdpa_policy_on_span_attention_and_a_padded_run_does_not():
    """The attention is chosen when the model loads; the packing layout reads it and changes nothing."""
    for packing, expected in ((True, IMPLEMENTATION), (False, "sdpa")):
        config = load_config(None, ["model.name=tiny", f"data.packing={str(packing).lower()}"])
        model, _ = load_policy(config)
        assert model.config._attn_implementation == expected
        layout = packing_layout(model, config)
        assert model.config._attn_implementation == expected
        assert layout == (PackingLayout("shared_one", "spans") if packing else None)
    # A model loaded without span attention keeps its own: a packed layout then uses a dense mask.
    model, _ = build_tiny_model(seed=0)
    layout = packing_layout(model, load_config(None, ["model.name=tiny", "data.packing=true"]))
    assert model.config._attn_implementation == "sdpa" and layout == PackingLayout("shared", "mask")


# ------------------------------------------------------------------ the GPU path: FlexAttention
GQA_PROMPTS = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10], [11, 12, 13]]
GQA_COMPLETIONS = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [30, 31]]
PACKED_KEYS = ("input_ids", "position_ids", "sequence_index", "completion_mask")


@pytest.mark.parametrize("rows", ["longest", "shared", "one", "shared_one"])
def test_the_block_mask_is_the_packed_mask(rows):
    """Token by token, the FlexAttention block mask's rule is the dense packed mask's."""
    packed = pack_sequences(GQA_PROMPTS, GQA_COMPLETIONS, 0, rows=rows)
    sequence, group = packed["sequence_index"], packed.get("group_index")
    block_mask = packed_block_mask(sequence, group, packed["completion_mask"])
    r, w = sequence.shape
    b, q, kv = torch.meshgrid(torch.arange(r), torch.arange(w), torch.arange(w), indexing="ij")
    rule = block_mask.mask_mod(b, torch.zeros_like(b), q, kv)
    dense = packed_attention_mask(sequence, group_index=group, completion_mask=packed["completion_mask"])
    assert torch.equal(rule, dense[:, 0])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the CPU reference
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_flex_packed_forward_gives_the_padded_logprobs(monkeypatch, dtype, tolerance):
    """Forward only: PyTorch 2.13 has no FlexAttention backward on the CPU (the GPU device script,
    benchmarks/gpu_check.py, compares gradients on CUDA). Grouped-query heads, every layout."""
    model = _gqa_model().to(dtype)
    padded = collate_sequences(GQA_PROMPTS, GQA_COMPLETIONS, 0)
    assert use_span_attention(model)
    with torch.no_grad():
        reference = sequence_logprobs(
            model, *(padded[k] for k in ("input_ids", "attention_mask", "completion_mask"))
        )
        for rows in ("longest", "shared", "one", "shared_one"):
            packed = pack_sequences(GQA_PROMPTS, GQA_COMPLETIONS, 0, rows=rows)
            inputs = [packed[k] for k in PACKED_KEYS]
            result = packed_sequence_logprobs(
                model, *inputs, group_index=packed.get("group_index"), attention="flex"
            )
            torch.testing.assert_close(result.summed, reference.summed, atol=tolerance, rtol=tolerance)
        # The check can fail: a block mask that ignores the shared layout's groups hides the prompt
        # from every completion but the first.
        monkeypatch.setattr(
            packed_logprobs_module, "packed_block_mask", lambda sequence, *_: packed_block_mask(sequence)
        )
        leaky = packed_sequence_logprobs(model, *inputs, group_index=packed["group_index"], attention="flex")
    assert not torch.allclose(leaky.summed, reference.summed, atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_a_flex_packed_forward_reads_nothing_from_the_device(device_reads):
    """Neither distalign's forward nor transformers' mask preprocessing reads a value (on a GPU each
    read would wait for it): the block mask reaches the layers as the attention mask, as it is. The
    host-side checks, which a device skips (tests/train/test_host_reads.py), are left out."""
    model = _gqa_model()
    assert use_span_attention(model)
    packed = pack_sequences(GQA_PROMPTS, GQA_COMPLETIONS, 0, rows="shared_one")
    module = SequenceLogprobModel(model)
    module.packed_attention = "flex"  # what a model on CUDA gets
    with torch.no_grad():
        device_reads.counting = True
        batch_logprobs(module, packed)
        device_reads.counting = False
    reads = {where: n for where, n in device_reads.where.items() if "(_check_" not in where}
    assert reads == {}, device_reads.where


def test_sampling_with_the_switched_model_stays_on_sdpa():
    """Neither spans nor a block mask: the registered implementation is transformers' SDPA, so
    generation never compiles FlexAttention."""
    model = _gqa_model()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
        assert use_span_attention(model)
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
