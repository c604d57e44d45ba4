"""Exact sequence log-probabilities of completions under a causal LM, without full-vocabulary blow-up.

Convention (the data layer's): ``completion_mask[b, t] = 1`` iff ``input_ids[b, t]`` is a completion
token. Position ``t - 1`` predicts token ``t``, so position 0 is never a completion token.

A naive implementation materialises ``log_softmax`` over the whole ``[B, T, V]`` logits in float32 —
for a 150k vocabulary and 8k tokens that is gigabytes per sequence. :func:`sequence_logprobs` instead
runs the decoder to its final hidden states, keeps only the ``N`` positions that predict completion
tokens, and pushes them through the output head in chunks: each chunk's ``[chunk, V]`` logits are
reduced at once to ``target_logit - logsumexp`` in float32 and discarded. Backward recomputes each
chunk's logits instead of keeping them: through a plain linear head with a hand-written backward
(:mod:`distalign.models.fused_head`: one recompute, gradients written directly), through any other
head (e.g. LoRA-wrapped) under ``torch.utils.checkpoint``. Peak extra memory is one ``[chunk, V]``
block, forward and backward.

The model-introspection helpers the padded and packed paths share live here too: the causal LM
inside peft/DDP wrappers (:func:`causal_lm_of`) and the lean decoder + head path
(:func:`lean_path_supported`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distalign.data.collate import padded_predictor_positions
from distalign.models.fused_head import LogitTransform, fused_head_logprobs

logger = logging.getLogger(__name__)

# Architectures whose causal-LM head is exactly ``lm_head(final_hidden_states)``. Others are probed
# once (lean path vs. the model's own logits) and fall back to full logits on a mismatch.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})
_lean_decisions: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class SequenceLogprobs:
    """Per-sequence completion log-probabilities.

    ``summed``: [B] sum of log p(token) over completion tokens (nats; float32, float64 for a float64
    model). ``counts``: [B] number of completion tokens (float). ``heads``: [B] outputs of model heads
    on each row's last prompt token, by name (empty unless heads were asked for).
    """

    summed: Tensor
    counts: Tensor
    heads: dict[str, Tensor] = field(default_factory=dict)

    @property
    def mean(self) -> Tensor:
        """[B] average log-probability per completion token (0 for a sequence without any)."""
        return self.summed / self.counts.clamp_min(1)


def default_position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] positions counting attended tokens only, so left padding does not shift them.

    This is what ``generate`` uses; for right padding it equals ``arange(T)`` on every real token.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _check_masks(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    if (
        input_ids.dim() != 2
        or input_ids.shape != attention_mask.shape
        or input_ids.shape != completion_mask.shape
    ):
        raise ValueError(
            "input_ids, attention_mask and completion_mask must all be [B, T]; got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    if completion_mask.device.type != "cpu":
        # Reading mask values on an accelerator stalls it once per forward pass. The loops' batches come
        # from data.collate, whose masks are right by construction (tests/data); check a hand-built
        # batch on the CPU first.
        return
    if bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be 0: no position predicts the first token")
    if bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError(
            "every completion token must be attended (attention_mask = 1 where completion_mask = 1)"
        )


def accepts_argument(module: nn.Module, argument: str) -> bool:
    parameters = inspect.signature(module.forward).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def model_inputs(
    module: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None
) -> dict:
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if accepts_argument(module, "position_ids"):
        inputs["position_ids"] = (
            default_position_ids(attention_mask) if position_ids is None else position_ids
        )
    return inputs


def _logit_postprocess(config: Any) -> LogitTransform | None:
    """The transform some architectures apply after the output head (scaling, soft-capping)."""
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if isinstance(logit_scale, (int, float)) and logit_scale != 1:
        scale *= logit_scale
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides
    if isinstance(logits_scaling, (int, float)) and logits_scaling != 1:
        scale /= logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap > 0 else None
    if scale == 1.0 and softcap is None:
        return None
    return LogitTransform(scale, softcap)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft model (adapters stay injected in it)."""
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            raise NotImplementedError("prompt-learning peft methods are not supported; use LoRA")
        return model.get_base_model()
    return model


def _decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    get_decoder = getattr(causal_lm, "get_decoder", None)
    get_head = getattr(causal_lm, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is causal_lm:
        return None
    return decoder, head


def _lean_matches_full(causal_lm: nn.Module, decoder: nn.Module, head: nn.Module) -> bool:
    """Probe: do decoder + head (+ known post-processing) reproduce the model's own logits?"""
    parameter = next(causal_lm.parameters())
    vocab_size = int(getattr(causal_lm.config, "vocab_size", 2))
    input_ids = (torch.arange(1, 9, device=parameter.device) % vocab_size)[None]
    attention_mask = torch.ones_like(input_ids)
    with probing(causal_lm):
        full = causal_lm(**model_inputs(causal_lm, input_ids, attention_mask, None)).logits.float()
        hidden = decoder(**model_inputs(decoder, input_ids, attention_mask, None))[0]
        lean = head(hidden).float()
        postprocess = _logit_postprocess(causal_lm.config)
        if postprocess is not None:
            lean = postprocess(lean)
    tolerance = probe_tolerance(parameter.dtype)
    return full.shape == lean.shape and torch.allclose(lean, full, atol=tolerance, rtol=tolerance)


@contextlib.contextmanager
def probing(causal_lm: nn.Module) -> Iterator[None]:
    """No gradients and every module in eval mode (dropout would make two passes differ), restored."""
    modes = {module: module.training for module in causal_lm.modules()}
    causal_lm.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def probe_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def lean_path_supported(model: nn.Module) -> bool:
    """Whether :func:`sequence_logprobs` can use the decoder + chunked head path for ``model``.

    Decided once per model (known plain-head architecture, or a one-off probe against its own logits)
    and remembered.
    """
    causal_lm = causal_lm_of(model)
    if causal_lm in _lean_decisions:
        return _lean_decisions[causal_lm]
    parts = _decoder_and_head(causal_lm)
    config = getattr(causal_lm, "config", None)
    if parts is None:
        decision = False
    elif (
        getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES and _logit_postprocess(config) is None
    ):
        decision = True
    else:
        decision = _lean_matches_full(causal_lm, *parts)
    if not decision:
        logger.warning(
            "%s: computing log-probs from full logits (the output head could not be reproduced in chunks)",
            type(causal_lm).__name__,
        )
    _lean_decisions[causal_lm] = decision
    return decision


def _chunk_token_logprobs(
    head: nn.Module | None, postprocess: Callable[[Tensor], Tensor] | None, features: Tensor, targets: Tensor
) -> Tensor:
    """[n] log p(target) for one chunk: features [n, H] (or logits [n, V] when head is None)."""
    logits = features if head is None else head(features)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if postprocess is not None:
        logits = postprocess(logits)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _can_fuse(head: nn.Module | None) -> bool:
    """The fused backward needs the head's own weight and bias: a plain ``nn.Linear`` (not LoRA-wrapped)."""
    return type(head) is nn.Linear


def _chunked_token_logprobs(
    head: nn.Module | None,
    postprocess: LogitTransform | None,
    features: Tensor,
    targets: Tensor,
    chunk_size: int,
) -> Tensor:
    """[N] token log-probs from features [N, H] (or [N, V] logits), one [chunk, V] block at a time.

    With gradients through a plain linear head, the fused function with a hand-written backward
    (:mod:`distalign.models.fused_head`); otherwise (a wrapped head, e.g. LoRA on the output layer,
    or full logits) each chunk runs under ``torch.utils.checkpoint``."""
    recompute = torch.is_grad_enabled() and features.requires_grad
    if recompute and _can_fuse(head):
        return fused_head_logprobs(features, head, targets, postprocess, chunk_size)
    chunk_fn = partial(_chunk_token_logprobs, head, postprocess)
    pieces = []
    for start in range(0, features.shape[0], chunk_size):
        chunk = (features[start : start + chunk_size], targets[start : start + chunk_size])
        if recompute:  # keep no [chunk, V] tensor alive for backward; recompute it there instead
            pieces.append(checkpoint(chunk_fn, *chunk, use_reentrant=False))
        else:
            pieces.append(chunk_fn(*chunk))
    if not pieces:
        return features.new_zeros(0, dtype=torch.promote_types(features.dtype, torch.float32))
    return torch.cat(pieces)


def summed_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    inputs: Callable[[nn.Module], dict],
    predictors: Tensor,
    targets: Tensor,
    owner: Tensor,
    num_sequences: int,
    *,
    chunk_size: int,
    lean: bool | None,
    heads: nn.ModuleDict | None,
    head_index: Tensor | None,
    detach_head_input: bool,
) -> SequenceLogprobs:
    """The computation both layouts share. ``inputs(module)`` gives the keyword arguments of the decoder
    (lean) or the causal LM; ``predictors`` [N] are the flat positions ``r * T + t`` whose outputs
    predict the completion tokens ``targets`` [N], ``owner`` [N] the sequence each of them scores
    (a position may predict several tokens: a shared prompt's last one); ``head_index`` [S] is the flat
    position ``r * T + t`` each head reads per sequence."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    causal_lm = causal_lm_of(model)
    if lean is None:
        lean = lean_path_supported(model)
    if lean:
        parts = _decoder_and_head(causal_lm)
        if parts is None:
            raise ValueError(f"{type(causal_lm).__name__} exposes no decoder/output head for the lean path")
        decoder, head = parts
        hidden = decoder(**inputs(decoder))[0]  # [R, T, H]
        features = hidden.flatten(0, 1)[predictors]  # [N, H]
        postprocess = _logit_postprocess(causal_lm.config)
    else:
        outputs = causal_lm(**inputs(causal_lm), output_hidden_states=bool(heads))
        hidden = outputs.hidden_states[-1] if heads else None  # the final (normalised) decoder state
        features, head, postprocess = outputs.logits.flatten(0, 1)[predictors], None, None  # [N, V]
    token_logps = _chunked_token_logprobs(head, postprocess, features, targets, chunk_size)
    # Accumulate in float64 so a long completion's sum carries only the final float32 rounding.
    accumulated = token_logps.new_zeros(num_sequences, dtype=torch.float64)
    summed = accumulated.index_add(0, owner, token_logps.double()).to(token_logps.dtype)
    counts = torch.bincount(owner, minlength=num_sequences).to(summed.dtype)
    head_outputs = {}
    if heads:
        if head_index is None:
            raise ValueError("model heads need head_positions (each sequence's last prompt token)")
        states = hidden.flatten(0, 1)[head_index]  # [S, H]
        states = states.detach() if detach_head_input else states
        head_outputs = {name: module(states) for name, module in heads.items()}
    return SequenceLogprobs(summed=summed, counts=counts, heads=head_outputs)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
    lean: bool | None = None,
    heads: nn.ModuleDict | None = None,
    head_positions: Tensor | None = None,
    detach_head_input: bool = False,
    predictor_positions: Tensor | None = None,
) -> SequenceLogprobs:
    """Exact summed log-probability of each row's completion tokens, memory-lean.

    Args:
        model: a transformers causal LM, optionally peft-wrapped (not a DDP/FSDP wrapper: see
            :class:`SequenceLogprobModel`).
        input_ids, attention_mask, completion_mask: [B, T]; padding may be on either side.
        position_ids: [B, T]; default counts attended tokens (see :func:`default_position_ids`).
        chunk_size: completion positions per output-head chunk; peak extra memory ~ chunk_size x V floats.
        lean: force (True) or forbid (False) the decoder + chunked-head path; None decides per model.
        heads: model heads (:mod:`distalign.models.heads`) to evaluate on the final hidden state.
        head_positions: [B] the position each head reads (the last prompt token); needed with heads.
        detach_head_input: heads read a detached hidden state, so their losses train the heads only.
        predictor_positions: [N] flat ``b * T + t`` of each position predicting a completion token, as
            :func:`~distalign.data.collate.collate_sequences` computes them on the host; found in
            ``completion_mask`` here when None.

    Returns:
        :class:`SequenceLogprobs` with ``summed`` [B], ``counts`` [B] and ``heads`` (name -> [B]).
    """
    _check_masks(input_ids, attention_mask, completion_mask)
    width = input_ids.shape[1]
    if predictor_positions is None:
        predictor_positions = padded_predictor_positions(completion_mask)
    batch_index = torch.div(predictor_positions, width, rounding_mode="floor")
    head_index = None
    if head_positions is not None:
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        head_index = rows * input_ids.shape[1] + head_positions
    return summed_logprobs(
        model,
        input_ids,
        partial(model_inputs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids),
        predictor_positions,
        input_ids.flatten()[predictor_positions + 1],
        batch_index,
        input_ids.shape[0],
        chunk_size=chunk_size,
        lean=lean,
        heads=heads,
        head_index=head_index,
        detach_head_input=detach_head_input,
    )
