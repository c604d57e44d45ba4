"""Whether packed log-probs are exact for a model: refusals by configuration, and a one-off probe.

Packing (:func:`distalign.models.packed_logprobs.packed_sequence_logprobs`) replaces the model's own
causal mask by a block-diagonal one (or, for flash-attention kernels, by sequence boundaries read from
``position_ids``). That is exact only where attention is plain causal attention over each sequence and
honours that mask and the restarting positions. :func:`packing_problem` says why not, naming the model
type, so the training loop can refuse before any step instead of silently training on a different
computation.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from torch import nn

from distalign.data.collate import PackingLayout, collate_sequences, pack_sequences, to_device
from distalign.models.packed_logprobs import (
    packed_attention_kind,
    packed_sequence_logprobs,
    packing_layout_of,
)
from distalign.models.token_logprobs import causal_lm_of, probe_tolerance, probing, sequence_logprobs

logger = logging.getLogger(__name__)

# Architectures whose attention honours a custom 4D mask and ``position_ids`` (checked here with the
# probe on CPU). Where the probe cannot run (a flash-attention kernel on a model not yet on a GPU,
# or ZeRO-3 partitioned weights) only these are packed.
_PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})
_packing_probes: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def _mask_limit(config: Any, max_length: int | None) -> str | None:
    """A mask restriction beyond causality that a block-diagonal mask would drop (sliding windows,
    chunked attention, other layer kinds), when it can bind on sequences of ``max_length`` tokens
    (None: any length)."""
    layer_types = set(getattr(config, "layer_types", None) or ())
    unknown = sorted(layer_types - {"full_attention", "sliding_attention", "chunked_attention"})
    if unknown:
        return f"its layers include {', '.join(unknown)}, which a packed mask does not reproduce"
    if layer_types:
        sliding = "sliding_attention" in layer_types
        chunked = "chunked_attention" in layer_types
    else:  # older configs: a window set and switched on
        sliding = getattr(config, "use_sliding_window", True) is not False
        chunked = True
    limits = (
        ("sliding-window", getattr(config, "sliding_window", None) if sliding else None),
        ("chunked", getattr(config, "attention_chunk_size", None) if chunked else None),
    )
    for kind, limit in limits:
        if isinstance(limit, int) and limit > 0 and (max_length is None or limit < max_length):
            bound = f"{limit} tokens" + (f" < data.max_length={max_length}" if max_length else "")
            return f"it uses {kind} attention ({bound}), which a packed mask does not reproduce"
    return None


def _packed_vs_padded(causal_lm: nn.Module, model: nn.Module, layout: PackingLayout) -> float:
    """Probe: the largest difference, relative to max(1, |value|), between the packed and the padded
    summed log-probs of three short sequences, the first two with one prompt (packed in two rows, one
    ending in padding, or in one; with ``layout.rows="shared"`` the common prompt once)."""
    parameter = next(causal_lm.parameters())
    vocab_size = max(int(getattr(causal_lm.config, "vocab_size", 2)) - 1, 1)
    tokens = [[(t * (k + 3)) % vocab_size + 1 for t in range(1, n + 1)] for k, n in enumerate((9, 5, 3))]
    prompts, completions = [t[:2] for t in tokens], [t[2:] for t in tokens]
    prompts[1] = prompts[0]
    padded_batch = collate_sequences(prompts, completions, 0)
    packed_batch = pack_sequences(prompts, completions, 0, rows=layout.rows)
    padded_batch, packed_batch = (
        to_device(batch, parameter.device) for batch in (padded_batch, packed_batch)
    )
    with probing(causal_lm):
        padded = sequence_logprobs(model, *(padded_batch[k] for k in _PADDED_KEYS))
        packed = packed_sequence_logprobs(
            model,
            *(packed_batch[k] for k in _PACKED_KEYS),
            group_index=packed_batch.get("group_index"),
            attention=layout.attention,
        )
    scale = padded.summed.double().abs().clamp_min(1)
    return float(((packed.summed.double() - padded.summed.double()).abs() / scale).max())


_PADDED_KEYS = ("input_ids", "attention_mask", "completion_mask")
_PACKED_KEYS = ("input_ids", "position_ids", "sequence_index", "completion_mask")


def _probe_packing(causal_lm: nn.Module, model: nn.Module) -> str | None:
    """Why packing is not exact for this model (None: it is), decided by the probe where it can run."""
    parameter = next(causal_lm.parameters())
    if hasattr(parameter, "ds_id"):  # DeepSpeed ZeRO-3 partitions: the weights to run it are not here
        unprobed = "its weights are ZeRO-3 partitions (built by deepspeed.zero.Init), so the probe cannot run"
    elif packed_attention_kind(model) == "varlen" and parameter.device.type != "cuda":
        unprobed = "its flash-attention kernel cannot be probed before the model is on a GPU"
    else:
        unprobed = None
    if unprobed is not None:
        if getattr(causal_lm.config, "model_type", None) in _PACKING_MODEL_TYPES:
            logger.info("packing: known architecture, not probed (%s)", unprobed)
            return None
        return f"{unprobed}, and the architecture is not one known to pack exactly"
    layouts = dict.fromkeys((packing_layout_of(model), packing_layout_of(model, share_prompts=True)))
    try:
        difference = max(_packed_vs_padded(causal_lm, model, layout) for layout in layouts)
    except (ValueError, TypeError, RuntimeError) as err:
        return f"a packed forward failed ({type(err).__name__}: {err})"
    if not difference <= probe_tolerance(parameter.dtype):  # NaN fails too
        return (
            f"packed log-probs of a probe differ from padded ones (relative difference {difference:.3g}): "
            "its attention does not keep packed sequences apart (a custom 4D mask or restarting "
            "position ids is ignored)"
        )
    return None


def packing_problem(model: nn.Module, max_length: int | None = None) -> str | None:
    """Why :func:`packed_sequence_logprobs` would not be exact for ``model`` (None: it is), naming the
    model type and attention implementation.

    Refused: sliding-window or chunked attention that can bind on sequences of ``max_length`` tokens
    (a block-diagonal mask drops it), and any model whose packed log-probs of a probe differ from the
    padded ones (attention that ignores the 4D mask or the restarting position ids, state carried
    across tokens, ...). The probe runs once per model; a flash-attention model that is not on a GPU
    yet, or one whose weights are ZeRO-3 partitions, cannot run it and is accepted only for
    architectures known to pack exactly.
    """
    causal_lm = causal_lm_of(model)
    config = getattr(causal_lm, "config", None)
    name = (
        f"model type {getattr(config, 'model_type', None)!r} ({type(causal_lm).__name__}, attention "
        f"{getattr(config, '_attn_implementation', None)!r})"
    )
    limit = _mask_limit(config, max_length)
    if limit is not None:
        return f"{name}: {limit}"
    if causal_lm not in _packing_probes:
        _packing_probes[causal_lm] = _probe_packing(causal_lm, model)
    problem = _packing_probes[causal_lm]
    return None if problem is None else f"{name}: {problem}"
