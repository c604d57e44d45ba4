"""The policy forward: :class:`SequenceLogprobModel`, the module the training loop prepares, scoring
a padded batch with :func:`~distalign.models.token_logprobs.sequence_logprobs` and a packed one with
:func:`~distalign.models.packed_logprobs.packed_sequence_logprobs`.

:func:`~distalign.models.packed_logprobs.packed_sequence_logprobs` scores the padding-free layout of
:func:`distalign.data.collate.pack_sequences` (sequences end to end, position ids restarting at 0),
each sequence's attention confined to it as the run's :class:`~distalign.data.collate.PackingLayout`
says (a 4D mask, spans, FlexAttention or flash kernels' variable-length path), each token's log-prob
summed into its own sequence's total. :func:`distalign.models.packing.packing_problem` decides, once
per model, whether packing is exact for it (a probe against the padded layout), and says why not.
"""

from __future__ import annotations

from torch import Tensor, nn

from distalign.data.collate import PackedBatch, PackingLayout
from distalign.models.packed_logprobs import packed_attention_kind, packed_sequence_logprobs
from distalign.models.token_logprobs import causal_lm_of, lean_path_supported, sequence_logprobs


class SequenceLogprobModel(nn.Module):
    """A causal LM whose ``forward`` returns per-sequence completion log-probs (memory-lean).

    This is the module the training loop hands to ``accelerator.prepare``. The lean computation calls
    the LM's decoder and output head separately; done from outside, on a DDP/FSDP/DeepSpeed-wrapped
    LM, those calls would bypass the wrapper's forward and with it gradient synchronisation, parameter
    all-gathers and resharding. Running them inside this module's ``forward`` keeps the whole
    computation under the wrapper, whatever the strategy.

    ``forward(input_ids, attention_mask, completion_mask, position_ids=None) -> (summed [B], counts [B])``;
    with ``head_positions`` [B] (each row's last prompt token) it returns ``(summed, counts, heads)``,
    ``heads`` the outputs [B] of the module's model heads by name. The heads live in this module
    (``self.heads``), so a DDP/FSDP wrapper synchronises them with the model. With ``sequence_index``
    the batch is packed (:func:`~distalign.models.packed_logprobs.packed_sequence_logprobs`:
    ``attention_mask`` is then only the [R, W] token mask, ``position_ids`` are required,
    ``head_positions`` are flat indices; with ``group_index`` too, prompts are shared) and the results
    are per sequence, attended as ``packing.attention`` says. :func:`batch_logprobs` calls it with
    either layout's batch.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int = 1024,
        lean: bool | None = None,
        heads: nn.ModuleDict | None = None,
        detach_head_input: bool = False,
        packing: PackingLayout | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.heads = heads if heads is not None else nn.ModuleDict()
        self.detach_head_input = detach_head_input
        self.chunk_size = chunk_size
        # Decided now, on the plain model, rather than inside a sharded forward later.
        self.lean = lean_path_supported(model) if lean is None else lean
        # A run's layout was decided at setup (train.setup.packing_layout); without one (a module built
        # directly), packed batches are attended as the model's own attention implementation allows.
        self.packed_attention = packing.attention if packing is not None else packed_attention_kind(model)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The LM's transformer-block classes. accelerate's FSDP2 auto-wrap policy reads them from the
        module it prepares, which is this one: without them the whole model would be one FSDP unit,
        gathered whole for every forward pass, instead of one unit per block."""
        return getattr(causal_lm_of(self.model), "_no_split_modules", None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_mask: Tensor,
        position_ids: Tensor | None = None,
        head_positions: Tensor | None = None,
        sequence_index: Tensor | None = None,
        group_index: Tensor | None = None,
        target_positions: Tensor | None = None,
        predictor_positions: Tensor | None = None,
        num_sequences: int | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        common = dict(
            chunk_size=self.chunk_size,
            lean=self.lean,
            heads=self.heads if head_positions is not None else None,
            head_positions=head_positions,
            detach_head_input=self.detach_head_input,
        )
        if sequence_index is None:
            result = sequence_logprobs(
                self.model,
                input_ids,
                attention_mask,
                completion_mask,
                position_ids=position_ids,
                predictor_positions=predictor_positions,
                **common,
            )
        else:
            if position_ids is None:
                raise ValueError("a packed batch needs its position_ids")
            result = packed_sequence_logprobs(
                self.model,
                input_ids,
                position_ids,
                sequence_index,
                completion_mask,
                group_index=group_index,
                attention=self.packed_attention,
                target_positions=target_positions,
                predictor_positions=predictor_positions,
                num_sequences=num_sequences,
                **common,
            )
        if head_positions is None:
            return result.summed, result.counts
        return result.summed, result.counts, result.heads


def batch_logprobs(
    module: nn.Module, batch: dict[str, Tensor], heads: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Call a (possibly DDP/FSDP-wrapped) :class:`SequenceLogprobModel` on a padded
    (:func:`~distalign.data.collate.collate_sequences`) or packed
    (:func:`~distalign.data.collate.pack_sequences`, a :class:`~distalign.data.collate.PackedBatch`)
    batch; with ``heads``, the heads read each sequence's last prompt token. Returns what its
    ``forward`` returns, per sequence."""
    packed = isinstance(batch, PackedBatch)
    if not packed and "sequence_index" in batch:
        raise ValueError(
            "a packed batch lost its type on the way here (a dict comprehension copied it): move it with "
            "distalign.data.collate.to_device, which keeps it a PackedBatch"
        )
    head_positions = None
    if heads:
        head_positions = batch["head_positions"] if packed else batch["prompt_lengths"] - 1
    packed_keys = ("position_ids", "sequence_index", "group_index", "target_positions")
    extra = {key: batch[key] for key in packed_keys if key in batch} if packed else {}
    if "predictor_positions" in batch:  # either layout: computed on the host by the collate
        extra["predictor_positions"] = batch["predictor_positions"]
    if packed:  # from a shape: counting the sequences on a device would wait for it
        extra["num_sequences"] = batch["head_positions"].shape[0]
    return module(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        head_positions=head_positions,
        **extra,
    )


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """Split a [2B, ...] result of one chosen+rejected forward into (chosen [B, ...], rejected [B, ...]).

    Matches ``distalign.data.collate.collate_pairs``: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
    """
    if values.shape[0] % 2:
        raise ValueError(f"expected an even leading dimension, got {values.shape[0]}")
    chosen, rejected = values.chunk(2, dim=0)
    return chosen, rejected
