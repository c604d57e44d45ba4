"""Attention for packed batches that computes only the blocks a packed sequence can see.

A packed row confines attention to each sequence with a block-diagonal causal mask. PyTorch's SDPA
kernels cannot skip masked blocks of an arbitrary mask, so a masked row of width W costs W x W scores
whatever it holds: one 1024-token DPO pair with a shared 512-token prompt ([prompt, chosen, rejected],
1536 tokens) cost SmolLM2's 30 layers 7.7 s of attention forward + backward per step on one CPU
thread, more than the padded batch's two 1024-token causal rows (4.9 s), eating most of what packing
saves in the linear layers.

Here the row is cut into *spans*, each one causal attention call over exactly the keys it may see:
a sequence (or a shared prompt with the first completion after it) is a causal block of its own; a
later completion of a shared prompt attends to the prompt in full and to itself causally (one call
with a [completion, prompt + completion] mask). The same row costs 4.3 s. The values are those of the
masked computation (each query sees the same keys; ``benchmarks`` and the tests compare).

On a GPU, many small SDPA calls per row cost a kernel launch each; there the same attention runs as
one FlexAttention call per layer (PyTorch's own, compiled once), over a ``BlockMask`` built once per
forward from the row's sequence and group indices (:func:`packed_block_mask`): it skips the blocks a
query cannot see, as spans do, in one kernel. PyTorch 2.13 has no FlexAttention backward on the CPU,
which keeps the spans there.

Wiring: transformers looks an attention function up by ``config._attn_implementation`` for every
layer call. A run loads its model on the implementation registered here
(``load_model_and_tokenizer(span_attention=True)``); :func:`use_span_attention` switches a model
already loaded (tests, benchmarks, a user's own model). The implementation is
PyTorch SDPA exactly as transformers' "sdpa" (it delegates) unless the forward call carries
``distalign_spans`` (:func:`attention_spans`, passed through the model's keyword arguments to every
attention layer) or a FlexAttention ``BlockMask`` as its attention mask (:func:`packed_block_mask`;
transformers hands a ready 4D mask to the layers as it is, without building its own or reading the
position ids for packed sequences). Sampling with the same model (no spans, no block mask) stays on
SDPA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLEMENTATION = "distalign_span_sdpa"
SPANS_KEYWORD = "distalign_spans"


@dataclass(frozen=True)
class Span:
    """Queries ``[start, end)`` of a row attend causally to themselves and, in full, to the keys
    ``[prefix_start, prefix_end)`` (a shared prompt; empty when ``prefix_start == prefix_end``)."""

    start: int
    end: int
    prefix_start: int = 0
    prefix_end: int = 0


def attention_spans(
    sequence_index: Tensor, group_index: Tensor | None = None, completion_mask: Tensor | None = None
) -> tuple[tuple[Span, ...], ...]:
    """The spans of every row of a packed batch (:func:`~distalign.data.collate.pack_sequences`):
    the same attention as :func:`~distalign.data.collate.packed_attention_mask`.

    Each run of equal ``sequence_index`` is a span (row-end padding, -1, is one of its own, as in the
    mask). In the shared-prompt layout (``group_index`` given) a group is [prompt, first completion,
    later completions]: the prompt carries the first completion's sequence index, so prompt and first
    completion form one causal span; each later completion is a span whose prefix is the prompt."""
    if group_index is not None and completion_mask is None:
        raise ValueError("the shared-prompt spans need the completion_mask")
    rows = []
    sequences = sequence_index.tolist()
    groups = group_index.tolist() if group_index is not None else None
    completions = completion_mask.tolist() if completion_mask is not None else None
    for r, row in enumerate(sequences):
        spans: list[Span] = []
        group_start, prompt_end, start = 0, 0, 0
        for t in range(1, len(row) + 1):
            if t < len(row) and row[t] == row[start]:
                continue
            if groups is None or row[start] < 0:
                spans.append(Span(start, t))
            elif start == 0 or groups[r][start - 1] != groups[r][start]:  # a group's first span
                group_start = start
                prompt_end = start
                while prompt_end < t and not completions[r][prompt_end]:
                    prompt_end += 1
                spans.append(Span(start, t))
            else:
                if not all(completions[r][start:t]) or prompt_end == group_start:
                    raise ValueError(
                        f"packed row {r}: positions {start}..{t - 1} follow their group's first "
                        "sequence but are not one completion after a prompt (not a shared-prompt layout)"
                    )
                spans.append(Span(start, t, group_start, prompt_end))
            start = t
        rows.append(tuple(spans))
    return tuple(rows)


def _span_output(query: Tensor, key: Tensor, value: Tensor, span: Span, **sdpa: object) -> Tensor:
    """One span's attention output [1, H, L, D] (queries, keys and values of one row: [1, H, T, D])."""
    q = query[:, :, span.start : span.end]
    k = key[:, :, span.start : span.end]
    v = value[:, :, span.start : span.end]
    if span.prefix_end == span.prefix_start:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
    prefix = slice(span.prefix_start, span.prefix_end)
    mask = _prefix_then_causal(span.end - span.start, span.prefix_end - span.prefix_start, query.device)
    k = torch.cat([key[:, :, prefix], k], dim=2)
    v = torch.cat([value[:, :, prefix], v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)


@functools.lru_cache(maxsize=512)
def _prefix_then_causal(length: int, prefix_length: int, device: torch.device) -> Tensor:
    """[length, prefix_length + length] boolean mask: every query sees the whole prefix, then the
    completion causally. Cached: every layer of a forward asks for the same shapes."""
    mask = torch.ones(length, prefix_length + length, dtype=torch.bool, device=device)
    mask[:, prefix_length:] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return mask


@torch.compiler.disable  # spans differ with every micro-batch: traced, each would recompile (train.compile)
def span_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: [B, H, T, D] queries, [B, Hkv, T, D] keys and values
    in, [B, T, H, D] out. Without ``distalign_spans`` or a ``BlockMask`` as ``attention_mask`` this is
    transformers' SDPA attention."""
    spans = kwargs.pop(SPANS_KEYWORD, None)
    if _is_block_mask(attention_mask):
        return _flex_attention_output(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if spans is None:
        return _sdpa_attention_forward()(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("span attention does not soft-cap attention scores")
    if len(spans) != query.shape[0]:
        raise ValueError(f"{len(spans)} rows of spans for a batch of {query.shape[0]} rows")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    sdpa = {"dropout_p": dropout, "scale": scaling}
    rows = [
        torch.cat(
            [_span_output(query[r : r + 1], key[r : r + 1], value[r : r + 1], s, **sdpa) for s in row], 2
        )
        for r, row in enumerate(spans)
    ]
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def packed_block_mask(
    sequence_index: Tensor, group_index: Tensor | None = None, completion_mask: Tensor | None = None
):
    """The FlexAttention ``BlockMask`` of a packed batch: the attention of
    :func:`~distalign.data.collate.packed_attention_mask` (query t sees key s iff s <= t in the same
    sequence; in the shared-prompt layout, in the same group and s a prompt token or in the same
    completion), on the batch's device. Blocks no query of theirs can see are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    if group_index is not None and completion_mask is None:
        raise ValueError("the shared-prompt block mask needs the completion_mask")
    rows, width = sequence_index.shape
    sequence = sequence_index
    if group_index is None:

        def mask_mod(b, h, q, kv):
            return (kv <= q) & (sequence[b, q] == sequence[b, kv])

    else:
        group, prompt = group_index, ~completion_mask.bool()

        def mask_mod(b, h, q, kv):
            visible = prompt[b, kv] | (sequence[b, q] == sequence[b, kv])
            return (kv <= q) & (group[b, q] == group[b, kv]) & visible

    return create_block_mask(mask_mod, rows, None, width, width, device=sequence_index.device)


def _is_block_mask(mask: object) -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _flex_attention_output(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_mask,
    dropout: float,
    scaling,
    **kwargs,
) -> tuple[Tensor, None]:
    """One FlexAttention call over the packed rows (transformers' layout in and out)."""
    if dropout > 0:
        raise ValueError(
            "packed FlexAttention has no attention dropout (set the model's attention_dropout to 0)"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("packed FlexAttention does not soft-cap attention scores")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention, as in the spans
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    output = _flex_attention(query.device.type)(query, key, value, block_mask=block_mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def _flex_attention(device_type: str):
    """FlexAttention, compiled once on an accelerator (uncompiled it materialises every score); on the
    CPU the eager reference, which the forward-only CPU tests use."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if device_type == "cpu" else torch.compile(flex_attention)


@functools.cache
def _sdpa_attention_forward():
    """transformers' SDPA attention function, imported once (this runs for every layer call)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def register_span_attention() -> None:
    """Make :data:`IMPLEMENTATION` known to transformers (its attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(IMPLEMENTATION, span_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_span_attention(model: nn.Module) -> bool:
    """Switch a model (a transformers causal LM, peft-wrapped or not) on transformers' SDPA attention to
    :data:`IMPLEMENTATION` (the same attention until a forward passes spans); returns whether it now
    uses it. Other implementations (eager, flash kernels, models that cannot change theirs) are left
    as they are."""
    from distalign.models.token_logprobs import causal_lm_of

    causal_lm = causal_lm_of(model)
    config = getattr(causal_lm, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == IMPLEMENTATION:
        return True
    can_set = getattr(causal_lm, "_can_set_attn_implementation", None)
    if current != "sdpa" or not callable(can_set) or not can_set():
        return False
    register_span_attention()
    causal_lm.set_attn_implementation(IMPLEMENTATION)
    return config._attn_implementation == IMPLEMENTATION
