"""Log-probs of a packed (padding-free) batch: sequences end to end in rows, positions restarting at 0.

The computation is :func:`distalign.models.token_logprobs.sequence_logprobs`'s, with two differences: each
token's log-prob is summed into its own sequence (``sequence_index``) rather than its row, and attention
is confined to each sequence by attention spans (:mod:`distalign.models.span_attention`: models on
SDPA, switched to it when packing is on), by a block-diagonal causal mask (eager and other
implementations) or, for flash-attention kernels, by the sequence boundaries transformers reads from
``position_ids``. Whether that is exact for a model is :mod:`distalign.models.packing`'s question.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from distalign.data.collate import PackedAttention, PackingLayout, packed_attention_mask
from distalign.data.collate import predictor_positions as derive_predictor_positions
from distalign.models.span_attention import IMPLEMENTATION as SPAN_ATTENTION
from distalign.models.span_attention import (
    SPANS_KEYWORD,
    attention_spans,
    packed_block_mask,
)
from distalign.models.token_logprobs import (
    SequenceLogprobs,
    accepts_argument,
    causal_lm_of,
    model_inputs,
    summed_logprobs,
)


def packed_attention_kind(model: nn.Module) -> PackedAttention:
    """How a packed batch's attention is confined to each sequence: "varlen" for flash-attention
    kernels (transformers derives the sequence boundaries from ``position_ids``; the batch must be one
    row); for a model on span attention (loaded with ``span_attention=True``),
    "flex" (one FlexAttention call over a block mask) when its weights are on a GPU and "spans" (one SDPA
    call per span) elsewhere; "mask" otherwise (a block-diagonal causal 4D mask)."""
    causal_lm = causal_lm_of(model)
    implementation = getattr(getattr(causal_lm, "config", None), "_attn_implementation", None)
    if implementation == SPAN_ATTENTION:
        return "flex" if next(causal_lm.parameters()).device.type == "cuda" else "spans"
    return "varlen" if "flash" in str(implementation or "") else "mask"


def packing_layout_of(model: nn.Module, share_prompts: bool = False) -> PackingLayout:
    """The :class:`~distalign.data.collate.PackingLayout` of ``model``: its attention kind
    (:func:`packed_attention_kind`) and the rows that suit it.

    Variable-length kernels and span attention cost each sequence's own attention whatever the row, so
    one row (no row-end padding at all); a dense mask costs the square of the row, so rows of the
    longest sequence. Prompts are shared (``share_prompts``) except for variable-length kernels, whose
    only input is sequence boundaries."""
    attention = packed_attention_kind(model)
    if attention == "varlen":
        rows = "one"
    elif attention in ("spans", "flex"):
        rows = "shared_one" if share_prompts else "one"
    else:
        rows = "shared" if share_prompts else "longest"
    return PackingLayout(rows=rows, attention=attention)


def _packed_inputs(
    module: nn.Module,
    *,
    input_ids: Tensor,
    position_ids: Tensor,
    sequence_index: Tensor,
    group_index: Tensor | None,
    completion_mask: Tensor,
    attention: str,
) -> dict:
    if not accepts_argument(module, "position_ids"):
        raise ValueError(f"{type(module).__name__}.forward takes no position_ids: packing needs them")
    if attention == "varlen":
        if input_ids.shape[0] != 1:
            raise ValueError("variable-length (flash) attention needs the packed batch in one row")
        if group_index is not None:
            raise ValueError("variable-length (flash) attention cannot share prompts: pack with rows='one'")
        return model_inputs(module, input_ids, None, position_ids)
    if attention == "spans":
        spans = attention_spans(sequence_index, group_index, completion_mask)
        return {**model_inputs(module, input_ids, None, position_ids), SPANS_KEYWORD: spans}
    if attention == "flex":  # built once per forward, read by every layer as its attention mask
        block_mask = packed_block_mask(sequence_index, group_index, completion_mask)
        return model_inputs(module, input_ids, block_mask, position_ids)
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    dtype = next(module.parameters()).dtype if implementation == "eager" else None
    mask = packed_attention_mask(
        sequence_index, dtype, group_index=group_index, completion_mask=completion_mask
    )
    return model_inputs(module, input_ids, mask, position_ids)


def _check_packed(
    input_ids: Tensor, position_ids: Tensor, sequence_index: Tensor, completion_mask: Tensor
) -> None:
    shapes = {tuple(t.shape) for t in (input_ids, position_ids, sequence_index, completion_mask)}
    if input_ids.dim() != 2 or len(shapes) != 1:
        raise ValueError(
            "input_ids, position_ids, sequence_index and completion_mask must all be [R, W]; got "
            + ", ".join(
                str(tuple(t.shape)) for t in (input_ids, position_ids, sequence_index, completion_mask)
            )
        )
    if completion_mask.device.type != "cpu":
        return  # as in token_logprobs._check_masks: on a device each check would wait for it
    completion = completion_mask.bool()
    if bool((completion & (sequence_index < 0)).any()):
        raise ValueError("a completion token lies on padding (sequence_index -1)")
    if bool(completion[:, 0].any()):
        raise ValueError(
            "a completion token starts a packed sequence (a row's first position): nothing predicts it"
        )


def _check_predictors(predictors: Tensor) -> None:
    if predictors.device.type == "cpu" and bool((predictors < 0).any()):  # on a device: see above
        raise ValueError("a completion has no prompt token before it in its packed sequence or group")


def packed_sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    sequence_index: Tensor,
    completion_mask: Tensor,
    *,
    group_index: Tensor | None = None,
    num_sequences: int | None = None,
    attention: str | None = None,
    chunk_size: int = 1024,
    lean: bool | None = None,
    heads: nn.ModuleDict | None = None,
    head_positions: Tensor | None = None,
    detach_head_input: bool = False,
    target_positions: Tensor | None = None,
    predictor_positions: Tensor | None = None,
) -> SequenceLogprobs:
    """:func:`sequence_logprobs` of a packed batch (:func:`~distalign.data.collate.pack_sequences`).

    Args:
        input_ids, position_ids, sequence_index, completion_mask: [R, W]; ``sequence_index`` names the
            sequence of each token (-1 on row-end padding); positions restart at 0 per sequence.
        group_index: [R, W] the shared-prompt layout's groups (``pack_sequences(rows="shared")``):
            completions attend to their group's prompt, laid out once; None: no prompt is shared.
        num_sequences: M; default ``sequence_index.max() + 1``.
        attention: "spans" (span attention), "flex" (FlexAttention over a block mask, the GPU path of
            a model on span attention), "mask" (block-diagonal causal 4D mask: eager/SDPA) or
            "varlen" (``position_ids`` only, one row: flash-attention kernels); default
            :func:`packed_attention_kind`.
        head_positions: [M] flat index ``r * W + t`` of each sequence's last prompt token.
        target_positions, predictor_positions: [N] the batch's
            :func:`~distalign.data.collate.predictor_positions`, when the packer computed them on the
            host (``pack_sequences`` does); derived from the masks here otherwise.
        chunk_size, lean, heads, detach_head_input: as for :func:`sequence_logprobs`.

    Returns:
        :class:`SequenceLogprobs` with ``summed`` [M], ``counts`` [M] and ``heads`` (name -> [M]), in
        sequence order. Exact: equal, up to float rounding, to the padded batch of the same sequences
        when :func:`~distalign.models.packing.packing_problem` finds none for the model.
    """
    _check_packed(input_ids, position_ids, sequence_index, completion_mask)
    if target_positions is None or predictor_positions is None:
        targets, predictors = derive_predictor_positions(completion_mask, sequence_index, group_index)
    else:
        targets, predictors = target_positions, predictor_positions
    _check_predictors(predictors)
    owner = sequence_index.flatten()[targets]  # [N] the sequence each predicted token belongs to
    if num_sequences is None:
        num_sequences = int(sequence_index.max()) + 1 if sequence_index.numel() else 0
    inputs = partial(
        _packed_inputs,
        input_ids=input_ids,
        position_ids=position_ids,
        sequence_index=sequence_index,
        group_index=group_index,
        completion_mask=completion_mask,
        attention=attention or packed_attention_kind(model),
    )
    return summed_logprobs(
        model,
        input_ids,
        inputs,
        predictors,
        input_ids.flatten()[targets],
        owner,
        num_sequences,
        chunk_size=chunk_size,
        lean=lean,
        heads=heads,
        head_index=head_positions,
        detach_head_input=detach_head_input,
    )
