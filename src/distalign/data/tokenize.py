"""Tokenisation with an exact prompt/completion boundary, and the truncation policy.

Exact boundary. Prompt and completion are tokenised *separately* and concatenated, so no token can
straddle the boundary and the completion mask is exact by construction:

- plain text: ``ids = tok(prompt) + tok(completion, add_special_tokens=False) + [eos]``. The texts are
  joined as given, so a completion that should follow the prompt after a space starts with that
  space (``"Review: ..."`` + ``" Great food."``). Tokenising the joined text in one call could merge
  the last prompt characters with the first completion characters into one token; here it cannot.
- chat template: the prompt is rendered with ``add_generation_prompt=True`` and the full conversation
  (prompt messages + completion messages) without it; the full text must start with the prompt text
  (otherwise the template is not prefix-stable and a ``DataError`` names the row). The completion
  text is the rest of the full text with trailing whitespace removed (the newline many templates put
  after the end-of-turn token belongs to the layout of a next turn, not to the response), tokenised
  with ``add_special_tokens=False``; special tokens written in it (``<|im_end|>``) map to their ids.
  The rendered prompt already holds any BOS text the template writes, so it is tokenised with
  ``add_special_tokens=False`` too.

EOS. With ``add_eos`` the tokenizer's EOS id is appended to a completion unless its last token already
is EOS (e.g. a ChatML template whose EOS is ``<|im_end|>``).

Truncation policy (``TokenizationSettings.truncation``):

- ``"truncate"``: a prompt longer than ``max_prompt_length`` is cut from the LEFT (its end, nearest
  the completion, is kept; a leading BOS is kept too); then each completion for which prompt +
  completion exceeds ``max_length`` is cut from the RIGHT, which loses its EOS. For pairs the prompt
  is cut once and shared by chosen and rejected. Counted: ``prompt_truncated``,
  ``completion_truncated`` (rows with any completion cut) and ``eos_lost``.
- ``"drop"``: a row whose prompt exceeds ``max_prompt_length`` or whose prompt + any completion
  exceeds ``max_length`` is dropped whole (both sides of a pair) and counted in ``dropped_too_long``.

Rows whose completion tokenises to nothing are dropped and counted (``empty_completion_dropped``). An
empty prompt becomes one BOS token (EOS when there is no BOS), so the first completion token is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distalign.data.formats import DataError, DataFormat
from distalign.data.signals import row_signals
from distalign.data.tokenized import (
    EncodedRow,
    TokenizationReport,
    TokenizationSettings,
    TokenizedCompletion,
    TokenizedList,
    TokenizedPair,
    TokenizedPrompt,
)

_ENCODE_CHUNK = 2048
_COMPLETION_FIELDS: dict[str, str] = {"paired": "chosen", "unpaired": "completion", "listwise": "responses"}


def _as_messages(value: str | list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, but conversational rows (or chat_template='on') need one; "
            "set tokenizer.chat_template or use plain-text data with chat_template='off'"
        )


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, Any]], use_chat_template: bool) -> str:
    """The prompt as the text the model sees before its completion.

    With the chat template: ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
    a plain string becoming one user message. Without: the string itself (a message list is an error).
    """
    if use_chat_template:
        _require_chat_template(tokenizer)
        messages = _as_messages(prompt, "user")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise DataError(
            "a conversational prompt (list of messages) cannot be rendered without a chat template"
        )
    return prompt


def chat_completion_text(
    tokenizer: Any, prompt: Any, completion: Any, prompt_text: str, row_index: int
) -> str:
    """The completion as the template renders it after ``prompt_text`` (trailing whitespace removed).

    Raises ``ValueError`` naming the row when the template does not render the prompt as a prefix of
    the full conversation.
    """
    messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"row {row_index} (0-based): the chat template is not prefix-stable: the rendered conversation does "
            f"not start with the rendered prompt, so the completion boundary is undefined.\n"
            f"prompt: {prompt_text[-200:]!r}\nfull: {full_text[: len(prompt_text) + 40][-240:]!r}"
        )
    return full_text[len(prompt_text) :].rstrip()


def _batch_encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
    return [list(x) for x in ids]


def _row_completions(row: Mapping[str, Any], fmt: DataFormat) -> list[Any]:
    if fmt == "paired":
        return [row["chosen"], row["rejected"]]
    if fmt == "unpaired":
        return [row["completion"]]
    if fmt == "listwise":
        return list(row["responses"])
    return []


def _uses_chat_template(row: Mapping[str, Any], settings: TokenizationSettings) -> bool:
    if settings.chat_template == "auto":
        return isinstance(row["prompt"], list)
    return settings.chat_template == "on"


def encode_rows(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings, fmt: DataFormat
) -> list[EncodedRow]:
    """Render and tokenise rows of format ``fmt`` without truncation (see the module docstring).

    Returns one ``EncodedRow`` per input row, in order; completions are in format order (chosen then
    rejected; the responses of a listwise row). Uses the tokenizer's batch call.
    """
    eos_id = tokenizer.eos_token_id
    if settings.add_eos and eos_id is None and fmt != "prompt":
        raise DataError("add_eos is set but the tokenizer has no eos_token")
    prompt_texts, uses_chat, completion_texts, owners = [], [], [], []
    for index, row in enumerate(rows):
        if "prompt" not in row or (fmt != "prompt" and _COMPLETION_FIELDS[fmt] not in row):
            raise ValueError(f"row {index} (0-based) is not a normalised {fmt} row; load it with load_rows")
        use_chat = _uses_chat_template(row, settings)
        if not use_chat and isinstance(row["prompt"], list):
            raise DataError(f"row {index} (0-based) is conversational, but chat_template='off'")
        prompt_text = render_prompt(tokenizer, row["prompt"], use_chat)
        prompt_texts.append(prompt_text)
        uses_chat.append(use_chat)
        for completion in _row_completions(row, fmt):
            if use_chat:
                completion_texts.append(
                    chat_completion_text(tokenizer, row["prompt"], completion, prompt_text, index)
                )
            else:
                completion_texts.append(completion)
            owners.append(index)
    prompts_ids = _encode_prompts(tokenizer, prompt_texts, uses_chat)
    encoded = [EncodedRow(i, prompts_ids[i], [], prompt_texts[i]) for i in range(len(rows))]
    for owner, ids in zip(owners, _batch_encode(tokenizer, completion_texts, add_special_tokens=False)):
        if settings.add_eos and ids and ids[-1] != eos_id:  # an empty one stays empty and is dropped
            ids.append(eos_id)
        encoded[owner].completions_ids.append(ids)
    return encoded


def _encode_prompts(tokenizer: Any, texts: list[str], uses_chat: list[bool]) -> list[list[int]]:
    """Plain prompts with the tokenizer's special tokens (BOS), rendered chat prompts without."""
    out: list[list[int]] = [[] for _ in texts]
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    for chat in (False, True):
        positions = [i for i, flag in enumerate(uses_chat) if flag == chat]
        encoded = _batch_encode(tokenizer, [texts[i] for i in positions], add_special_tokens=not chat)
        for position, ids in zip(positions, encoded):
            # some post-processors also append EOS; a prompt must not end a sequence
            if (
                not chat
                and ids
                and eos_id is not None
                and ids[-1] == eos_id
                and not texts[position].endswith(eos_text)
            ):
                ids = ids[:-1]
            out[position] = ids or _empty_prompt_ids(tokenizer)
    return out


def _empty_prompt_ids(tokenizer: Any) -> list[int]:
    """An empty prompt becomes one BOS (EOS without a BOS, the GPT-2 convention), so that the first
    completion token has a position that predicts it."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    raise DataError("an empty prompt needs a BOS or EOS token to condition on; the tokenizer has neither")


def _keep_prompt_end(prompt_ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if bos_id is not None and prompt_ids[0] == bos_id and limit > 1:
        return [bos_id] + prompt_ids[len(prompt_ids) - (limit - 1) :]
    return prompt_ids[len(prompt_ids) - limit :]


def apply_length_policy(
    encoded: Sequence[EncodedRow],
    settings: TokenizationSettings,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> tuple[list[EncodedRow], TokenizationReport]:
    """Truncate or drop rows per ``settings`` (module docstring) and count what happened.

    Returns the kept rows (new objects; the inputs are not modified) and the report.
    """
    report = TokenizationReport(
        rows_in=len(encoded), max_prompt_length=settings.max_prompt_length, max_length=settings.max_length
    )
    kept: list[EncodedRow] = []
    for row in encoded:
        prompt, completions = row.prompt_ids, row.completions_ids
        if any(not ids for ids in completions):
            report.empty_completion_dropped += 1
            continue
        report.longest_prompt = max(report.longest_prompt, len(prompt))
        report.longest_sequence = max(
            report.longest_sequence, len(prompt) + max((len(ids) for ids in completions), default=0)
        )
        too_long = any(len(prompt) + len(ids) > settings.max_length for ids in completions)
        if settings.truncation == "drop":
            if len(prompt) > settings.max_prompt_length or too_long:
                report.dropped_too_long += 1
                continue
        else:
            if len(prompt) > settings.max_prompt_length:
                prompt = _keep_prompt_end(prompt, settings.max_prompt_length, bos_token_id)
                report.prompt_truncated += 1
            room = settings.max_length - len(prompt)
            cut = [ids for ids in completions if len(ids) > room]
            if cut:
                report.completion_truncated += 1
                report.eos_lost += int(
                    eos_token_id is not None and any(ids[-1] == eos_token_id for ids in cut)
                )
                completions = [ids[:room] for ids in completions]
        kept.append(
            EncodedRow(row.row_index, list(prompt), [list(ids) for ids in completions], row.prompt_text)
        )
    report.rows_kept = len(kept)
    return kept, report


def _encode_and_fit(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings | None, fmt: DataFormat
) -> tuple[list[EncodedRow], TokenizationReport]:
    settings = settings or TokenizationSettings()
    encoded = encode_rows(rows, tokenizer, settings, fmt)
    return apply_length_policy(
        encoded, settings, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )


def _tokenize(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    settings: TokenizationSettings | None,
    fmt: DataFormat,
    make_item: Callable[[EncodedRow, Mapping[str, Any]], Any],
) -> tuple[list, TokenizationReport]:
    kept, report = _encode_and_fit(rows, tokenizer, settings, fmt)
    return [make_item(r, rows[r.row_index]) for r in kept], report


def tokenize_paired(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings | None = None
) -> tuple[list[TokenizedPair], TokenizationReport]:
    """Tokenise normalised paired rows; the prompt is truncated once and shared by both sides."""

    def pair(r: EncodedRow, row: Mapping[str, Any]) -> TokenizedPair:
        chosen, rejected = r.completions_ids
        return TokenizedPair(
            r.row_index,
            r.prompt_ids,
            chosen,
            rejected,
            float(row.get("weight", 1.0)),
            row_signals(row, "paired"),
        )

    return _tokenize(rows, tokenizer, settings, "paired", pair)


def tokenize_unpaired(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings | None = None
) -> tuple[list[TokenizedCompletion], TokenizationReport]:
    """Tokenise normalised unpaired rows (label True -> 1.0, False -> 0.0)."""

    def completion(r: EncodedRow, row: Mapping[str, Any]) -> TokenizedCompletion:
        (ids,) = r.completions_ids
        weight, signals = float(row.get("weight", 1.0)), row_signals(row, "unpaired")
        return TokenizedCompletion(r.row_index, r.prompt_ids, ids, float(row["label"]), weight, signals)

    return _tokenize(rows, tokenizer, settings, "unpaired", completion)


def tokenize_listwise(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings | None = None
) -> tuple[list[TokenizedList], TokenizationReport]:
    """Tokenise normalised listwise rows; the prompt is truncated once and shared by every response."""

    def scored_list(r: EncodedRow, row: Mapping[str, Any]) -> TokenizedList:
        scores = [float(score) for score in row["scores"]]
        weight, signals = float(row.get("weight", 1.0)), row_signals(row, "listwise")
        return TokenizedList(r.row_index, r.prompt_ids, r.completions_ids, scores, weight, signals)

    return _tokenize(rows, tokenizer, settings, "listwise", scored_list)


def tokenize_prompts(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, settings: TokenizationSettings | None = None
) -> tuple[list[TokenizedPrompt], TokenizationReport]:
    """Tokenise the prompts of rows of any format (for sampling); a truncated prompt's text is re-decoded."""
    settings = settings or TokenizationSettings()
    encoded = encode_rows(rows, tokenizer, settings, "prompt")
    kept, report = apply_length_policy(encoded, settings, bos_token_id=tokenizer.bos_token_id)
    prompts = []
    for r in kept:
        truncated = len(r.prompt_ids) != len(encoded[r.row_index].prompt_ids)
        text = tokenizer.decode(r.prompt_ids, skip_special_tokens=False) if truncated else r.prompt_text
        prompts.append(TokenizedPrompt(r.row_index, r.prompt_ids, text))
    return prompts, report
