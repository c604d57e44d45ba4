"""Ancestral sampling with exact log-probs, and teacher-forced scoring of given completions.

Importance weights, pseudo-rewards and log Z estimates (f-DPG, QRS) need log q(x) of the *exact*
distribution x was drawn from. ``model.generate`` silently applies a model's generation config (top-k 50,
repetition penalties, ...) and cannot take a ``torch.Generator``, so this module runs its own
KV-cached loop: every token is drawn with ``torch.multinomial`` from ``exp(log_probs)`` and the
same ``log_probs`` entry is added to the sequence log-prob.

Layout: prompts are left-padded to a common length so that all rows generate in the same column;
a finished row keeps receiving pad tokens that are neither scored nor returned. Rows are grouped by
prompt length before batching (less padding) and returned in the original order.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distalign.models.token_draw import check_warping, draw_from_logits, is_warped, warped_log_probs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Samples", "eos_token_ids", "sample_completions", "score_completions", "warped_log_probs"]


@dataclass
class Samples:
    """Completions drawn for a list of prompts; every field has one entry per sample (N in total).

    Samples are ordered prompt-major: the ``num_samples`` draws of prompt 0, then of prompt 1, ...
    ``context_index`` [N] long numbers the *distinct* prompts in order of first appearance (a prompt
    listed twice is one context: it shares log Z_c and leave-one-out baseline groups). ``logprobs`` is
    log q(completion | prompt) in nats (float32) under the exact distribution sampled from, summed over
    completion tokens up to and including EOS. A completion cut at ``max_new_tokens`` without EOS
    (``ended_with_eos`` False) carries the log-prob of that prefix only, i.e. of the event "the
    completion starts with these tokens", not of a complete sequence.
    """

    prompts: list[str]
    context_index: torch.Tensor
    completion_ids: list[list[int]]
    completion_texts: list[str]
    logprobs: torch.Tensor
    ended_with_eos: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def _eos_token_ids(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] | None
) -> list[int]:
    if eos_token_ids is not None:
        ids = list(eos_token_ids)
    else:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        generation_config = getattr(model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        ids += [configured] if isinstance(configured, int) else list(configured or [])
    if not ids:
        raise ValueError(
            "no EOS token: the tokenizer and the model's generation config define none; pass eos_token_ids"
        )
    return sorted(set(ids))


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that end a completion in :func:`sample_completions` by default: the tokenizer's EOS
    and the model's generation config's (another sampler must stop at exactly these)."""
    return _eos_token_ids(model, tokenizer, None)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _given_or_encoded_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    add_special_tokens: bool,
    prompt_ids: Sequence[Sequence[int]] | None,
) -> list[list[int]]:
    """``prompt_ids`` when the caller already holds the exact token ids, else ``prompts`` tokenised."""
    if prompt_ids is None:
        return _encode_prompts(tokenizer, prompts, add_special_tokens)
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every entry of prompt_ids needs at least one token to condition the first token on")
    return [list(ids) for ids in prompt_ids]


def _encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], add_special_tokens: bool
) -> list[list[int]]:
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(
                f"prompt {i} ({prompts[i]!r}) has no tokens, so there is nothing to condition the first "
                "token on; start prompts with a BOS token or pass add_special_tokens=True"
            )
    return encoded


def _left_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [B, max_len] long, with each row right-aligned."""
    return _padded(rows, pad_id, device, left=True)


def _right_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [B, max_len] long, with each row left-aligned."""
    return _padded(rows, pad_id, device, left=False)


def _padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    columns = torch.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return ids.to(device), mask.long().to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_parameters(model: torch.nn.Module) -> Mapping[str, inspect.Parameter]:
    """Named parameters of the transformers model's own ``forward`` (through peft and DDP wrappers).

    A peft model's ``forward`` takes ``**kwargs`` and passes them on, so its own signature says
    nothing about what the wrapped model accepts.
    """
    from distalign.models.loading import is_peft_model, unwrap_model

    inner = unwrap_model(model)
    if is_peft_model(inner):
        inner = inner.get_base_model()
    return _signature_parameters(type(inner))


@functools.cache
def _signature_parameters(model_class: type) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(model_class.forward).parameters


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    # Computing logits only for the positions we need avoids a [B, T, V] tensor over the prompt.
    return "logits_to_keep" in _forward_parameters(model)


def _cache_keyword(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument and output field: ``cache`` in transformers >= 5.x, where the old
    ``past_key_values`` is deprecated, else ``past_key_values`` (transformers 4.x)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _repeat_index(prompt_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(first row of each distinct prompt, per row the position of its prompt among the distinct ones)."""
    position: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    inverse: list[int] = []
    for row, ids in enumerate(prompt_ids):
        key = tuple(ids)
        if key not in position:
            position[key] = len(first)
            first.append(row)
        inverse.append(position[key])
    return first, inverse


def _prefill(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, object]:
    """Run the left-padded prompts [B, P] through ``model``: last-position logits [B, V] and the KV cache.

    Rows that repeat a prompt (the samples of one prompt) share its forward: each distinct prompt is run
    once and its cache rows are copied to its repeats (``Cache.reorder_cache``), the same tensors a
    forward of every row computes (up to floating-point summation order).
    """
    first, inverse = _repeat_index(prompt_ids)
    if len(first) < len(inverse):
        rows = torch.tensor(first, device=input_ids.device)
        logits, cache = _prompt_forward(model, input_ids[rows], mask[rows], positions[rows])
        if hasattr(cache, "reorder_cache"):  # else a legacy cache format: run every row below
            expand = torch.tensor(inverse, device=input_ids.device)
            cache.reorder_cache(expand)
            return logits[expand], cache
    return _prompt_forward(model, input_ids, mask, positions)


def _prompt_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, object]:
    cache_keyword = _cache_keyword(model)
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_keyword: None},
        **extra,
    )
    return out.logits[:, -1], getattr(out, cache_keyword)


@torch.no_grad()
def _sample_batch(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    warping: tuple[float, int | None, float | None],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one batch: generated ids [B, T'] (pads after EOS), log-probs [B] f64, ended [B] and the
    completion lengths [B] (up to and including EOS)."""
    device = _model_device(model)
    input_ids, mask = _left_padded(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    lengths = torch.zeros(len(prompt_ids), dtype=torch.long, device=device)
    logprobs = torch.zeros(len(prompt_ids), dtype=torch.float64, device=device)
    generated: list[torch.Tensor] = []
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    cache_keyword = _cache_keyword(model)
    logits, past = _prefill(model, prompt_ids, input_ids, mask, positions) if max_new_tokens else (None, None)
    for step in range(max_new_tokens):
        logits = logits.float()
        if is_warped(*warping):
            logits = warped_log_probs(logits, *warping)
        tokens, chosen = draw_from_logits(logits, generator)
        logprobs += torch.where(finished, 0.0, chosen.double())
        lengths += ~finished
        tokens = torch.where(finished, pad_id, tokens)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_keyword: past},
            **extra,
        )
        logits, past = out.logits[:, -1], getattr(out, cache_keyword)
    ids = torch.stack(generated, dim=1) if generated else torch.zeros((len(prompt_ids), 0), dtype=torch.long)
    return ids.cpu(), logprobs.cpu(), finished.cpu(), lengths.cpu()


def _distinct_index(prompts: Sequence[str], owner: list[int]) -> torch.Tensor:
    """Per sample, the index of its prompt among the distinct prompts (order of first appearance)."""
    first: dict[str, int] = {}
    for prompt in prompts:
        first.setdefault(prompt, len(first))
    return torch.tensor([first[prompts[i]] for i in owner], dtype=torch.long)


def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    warped_logprobs: bool = False,
    eos_token_ids: Sequence[int] | None = None,
    add_special_tokens: bool = False,
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> Samples:
    """Draw ``num_samples`` completions per prompt by ancestral sampling, with exact log-probs.

    ``prompts``: rendered strings (chat template already applied); tokenised with
    ``add_special_tokens`` (default False: a rendered template already holds its BOS). Any warping
    (temperature != 1, top_k, top_p < 1) requires ``warped_logprobs=True`` and then ``logprobs`` are
    under the warped distribution. EOS ids default to the tokenizer's plus the model generation
    config's. Runs in eval mode under ``no_grad`` (the model's train/eval mode is restored); the same
    ``generator`` state gives the same samples. Returns N = len(prompts) * num_samples samples.
    ``prompt_ids`` [len(prompts)]: condition on these exact token ids instead of tokenising ``prompts``
    (which then only label the samples), so a training loop scores exactly what was sampled.
    """
    check_warping(temperature, top_k, top_p, warped_logprobs)
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 0:
        raise ValueError("num_samples and batch_size must be >= 1 and max_new_tokens >= 0")
    eos_ids = _eos_token_ids(model, tokenizer, eos_token_ids)
    pad_id = _pad_token_id(tokenizer, eos_ids)
    encoded = _given_or_encoded_prompts(tokenizer, prompts, add_special_tokens, prompt_ids)
    owner = [i for i in range(len(prompts)) for _ in range(num_samples)]
    order = sorted(range(len(owner)), key=lambda j: len(encoded[owner[j]]))
    rows: list[list[int]] = [[] for _ in owner]
    logprobs = torch.zeros(len(owner), dtype=torch.float64)
    ended = torch.zeros(len(owner), dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [encoded[owner[j]] for j in chunk]
            ids, batch_logprobs, batch_ended, batch_lengths = _sample_batch(
                model, batch, eos_ids, pad_id, max_new_tokens, (temperature, top_k, top_p), generator
            )
            for j, row, length in zip(chunk, ids.tolist(), batch_lengths.tolist()):
                rows[j] = row[:length]
            logprobs[chunk] = batch_logprobs
            ended[chunk] = batch_ended
    finally:
        model.train(was_training)
    return Samples(
        prompts=[prompts[i] for i in owner],
        context_index=_distinct_index(prompts, owner),
        completion_ids=rows,
        completion_texts=tokenizer.batch_decode(rows, skip_special_tokens=True) if rows else [],
        logprobs=logprobs.float(),
        ended_with_eos=ended,
    )


@torch.no_grad()
def _score_batch(
    model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[B] float64 summed log-probs of the completions. Same layout as sampling: left-padded prompts
    ending in one column, completions right-padded after it."""
    device = _model_device(model)
    width = max(len(c) for c in completion_ids)
    if width == 0:
        return torch.zeros(len(prompt_ids), dtype=torch.float64)
    prompts, prompt_mask = _left_padded(prompt_ids, pad_id, device)
    completions, completion_mask = _right_padded(completion_ids, pad_id, device)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_width = prompts.shape[1]
    first, inverse = _repeat_index(prompt_ids)
    if len(first) < len(inverse):  # the prompts' forward shared by their repeats, then the completions
        logits, cache = _prefill(model, prompt_ids, prompts, prompt_mask, positions[:, :prompt_width])
        # [B, 1, V] predicts each completion's first token; scored apart from the rest rather than
        # concatenated with it, which would copy the [B, width, V] logits once more.
        token_logps = [_token_logprobs(logits[:, None], completions[:, :1])]
        if width > 1:
            rest = model(
                input_ids=completions[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, prompt_width:-1],
                use_cache=True,
                **{_cache_keyword(model): cache},
            ).logits
            token_logps.append(_token_logprobs(rest, completions[:, 1:]))
        completion_logps = torch.cat(token_logps, dim=1)
    else:
        extra = {"logits_to_keep": width + 1} if _supports_logits_to_keep(model) else {}
        ids = torch.cat([prompts, completions], dim=1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        # the positions predicting each completion token
        completion_logps = _token_logprobs(logits.logits[:, -(width + 1) : -1], completions)
    return torch.where(completion_mask.bool(), completion_logps, 0.0).double().sum(-1).cpu()


#: Rows of [rows, T, V] logits normalised at once by :func:`_token_logprobs`.
_LOG_SOFTMAX_ROWS = 4


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 log-softmax of ``logits`` [B, T, V] at ``tokens`` [B, T], a few rows at a time:
    the [B, T, V] float32 log-softmax of a whole batch (200 MB for 32 completions of 32 tokens over
    SmolLM2's 49k vocabulary) is never held, and the values are those of the whole-batch one (the
    log-softmax of a row does not depend on the others)."""
    parts = []
    for start in range(0, logits.shape[0], _LOG_SOFTMAX_ROWS):
        rows = slice(start, start + _LOG_SOFTMAX_ROWS)
        log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
        parts.append(log_probs.gather(-1, tokens[rows, :, None]).squeeze(-1))
    return torch.cat(parts)


def score_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completion_ids: list[list[int]],
    batch_size: int = 16,
    *,
    add_special_tokens: bool = False,
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Teacher-forced log pi(completion | prompt): [N] float32, nats, summed over the given ids.

    ``prompts[i]`` is tokenised as in :func:`sample_completions`; ``completion_ids[i]`` are scored as
    given (include the EOS id to score a complete sequence). Eval mode, no grad. ``prompt_ids``: exact
    prompt token ids to condition on instead of tokenising ``prompts`` (as in :func:`sample_completions`).
    """
    if len(prompts) != len(completion_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(completion_ids)} completions")
    encoded = _given_or_encoded_prompts(tokenizer, prompts, add_special_tokens, prompt_ids)
    pad_id = _pad_token_id(tokenizer, [0])
    scores = torch.zeros(len(prompts), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            scores[start:stop] = _score_batch(model, encoded[start:stop], completion_ids[start:stop], pad_id)
    finally:
        model.train(was_training)
    return scores.float()
