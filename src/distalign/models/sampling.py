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

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Samples", "sample_completions", "score_completions", "warped_log_probs"]


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


def _is_warped(temperature: float, top_k: int | None, top_p: float | None) -> bool:
    return temperature != 1.0 or top_k is not None or (top_p is not None and top_p < 1.0)


def _check_warping(temperature: float, top_k: int | None, top_p: float | None, warped_logprobs: bool) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy decoding has no sampling log-prob)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
    if _is_warped(temperature, top_k, top_p) and not warped_logprobs:
        raise ValueError(
            f"temperature={temperature}, top_k={top_k}, top_p={top_p} warp the model's distribution: samples "
            "would no longer come from the model, and log-probs under the model would make importance "
            "weights, pseudo-rewards and log Z estimates wrong. Sample with temperature=1.0, top_k=None, "
            "top_p=None, or pass warped_logprobs=True to get log-probs under the warped distribution."
        )


def warped_log_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Log-probs of the next-token distribution after temperature, top-k and top-p (nucleus) warping.

    ``logits`` [B, V] -> [B, V] float32 (removed tokens get -inf). Order as in HF generate: divide by
    temperature, keep the k largest (ties with the k-th value are kept), then keep the smallest set of
    most likely tokens whose probability reaches ``top_p`` (always at least one token).
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p  # the first token is never removed (mass_before = 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


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
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


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


def _draw(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.exp(log_probs)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(log_probs.device)


@torch.no_grad()
def _sample_batch(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    warping: tuple[float, int | None, float | None],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one batch: returns generated ids [B, T'] (pads after EOS), log-probs [B] f64, ended [B]."""
    device = _model_device(model)
    input_ids, mask = _left_padded(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    logprobs = torch.zeros(len(prompt_ids), dtype=torch.float64, device=device)
    generated: list[torch.Tensor] = []
    past = None
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    cache_keyword = _cache_keyword(model)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_keyword: past},
            **extra,
        )
        past = getattr(out, cache_keyword)
        log_probs = warped_log_probs(out.logits[:, -1], *warping)
        tokens = _draw(log_probs, generator)
        chosen = log_probs.gather(-1, tokens[:, None]).squeeze(-1).double()
        logprobs += torch.where(finished, torch.zeros_like(chosen), chosen)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        generated.append(tokens)
        finished |= torch.isin(tokens, eos)
        if bool(finished.all()):
            break
        input_ids = tokens[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    ids = torch.stack(generated, dim=1) if generated else torch.zeros((len(prompt_ids), 0), dtype=torch.long)
    return ids.cpu(), logprobs.cpu(), finished.cpu()


def _trim_at_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1], True
    return row, False


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
    _check_warping(temperature, top_k, top_p, warped_logprobs)
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
            ids, batch_logprobs, _ = _sample_batch(
                model, batch, eos_ids, pad_id, max_new_tokens, (temperature, top_k, top_p), generator
            )
            for k, j in enumerate(chunk):
                rows[j], ended[j] = _trim_at_eos(ids[k].tolist(), set(eos_ids))
                logprobs[j] = batch_logprobs[k]
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
    device = _model_device(model)
    prompt_width = max(len(p) for p in prompt_ids)
    completion_width = max(len(c) for c in completion_ids)
    if completion_width == 0:
        return torch.zeros(len(prompt_ids), dtype=torch.float64)
    # Same layout as sampling: left-padded prompts ending in one column, completions right-padded after it.
    rows = [
        [pad_id] * (prompt_width - len(p)) + list(p) + list(c) + [pad_id] * (completion_width - len(c))
        for p, c in zip(prompt_ids, completion_ids)
    ]
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        mask[i, prompt_width - len(p) : prompt_width + len(c)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": completion_width + 1} if _supports_logits_to_keep(model) else {}
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
    ).logits
    logits = logits[:, -(completion_width + 1) : -1].float()  # positions predicting each completion token
    targets = ids[:, prompt_width:]
    token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    completion_mask = mask[:, prompt_width:].bool()
    return torch.where(completion_mask, token_logps, torch.zeros_like(token_logps)).double().sum(-1).cpu()


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
