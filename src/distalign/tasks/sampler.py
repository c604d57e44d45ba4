"""A language model as a task sampler: prompts in, ``k`` ancestral samples per prompt out.

``make_dataset`` and ``build_preference_dataset`` take a :data:`~distalign.tasks.builders.SampleFn`;
:func:`model_sample_fn` builds one from a model and tokenizer, rendering prompts with the chat template
when asked (an instruct model sees the layout it was tuned on) and showing a progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distalign.data.tokenize import render_prompt
from distalign.tasks.base import Task
from distalign.tasks.builders import SampleFn


def model_device() -> torch.device:
    """The device sampling runs on: the first CUDA GPU when one is present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def uses_chat_template(tokenizer: Any, setting: str) -> bool:
    """Resolve a chat-template setting: "on", "off", or "auto" (= iff the tokenizer has a template)."""
    if setting == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if setting not in ("on", "off"):
        raise ValueError(f"chat_template={setting!r} is not valid; choose 'auto', 'on' or 'off'")
    return setting == "on"


def render_task_prompts(task: Task, tokenizer: Any, prompts: list[str], use_chat_template: bool) -> list[str]:
    """The text the model is conditioned on for each raw task prompt (with the task's system prompt)."""
    if use_chat_template:
        return [render_prompt(tokenizer, task.messages(p), True) for p in prompts]
    return list(prompts)


def model_sample_fn(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    use_chat_template: bool,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
    total_prompts: int | None = None,
    description: str = "sampling",
    temperature: float = 1.0,
) -> SampleFn:
    """A ``sample_fn(prompts [P], k) -> P lists of k completions`` drawing exact ancestral samples.

    One seeded ``torch.Generator`` serves every call, so the same sequence of calls gives the same
    completions. Plain prompts are tokenised with the tokenizer's special tokens (BOS), rendered chat
    prompts without, exactly as the data layer tokenises them for training. ``total_prompts`` sizes the
    progress bar (completions drawn so far). ``temperature`` != 1 samples the tempered distribution.
    """
    from distalign.models.sampling import sample_completions

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = tqdm(total=None if total_prompts is None else total_prompts, desc=description, unit="prompt")

    def sample_fn(prompts: list[str], k: int) -> list[list[str]]:
        rendered = render_task_prompts(task, tokenizer, prompts, use_chat_template)
        groups: list[list[str]] = []
        # Small chunks keep the progress bar moving; each chunk is still batched inside sample_completions.
        chunk = max(1, batch_size // k)
        for start in range(0, len(rendered), chunk):
            samples = sample_completions(
                model,
                tokenizer,
                rendered[start : start + chunk],
                num_samples=k,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                generator=generator,
                add_special_tokens=not use_chat_template,
                temperature=temperature,
                warped_logprobs=temperature != 1.0,
            )
            texts = samples.completion_texts
            groups += [texts[i * k : (i + 1) * k] for i in range(len(texts) // k)]
            bar.update(len(texts) // k)
        if total_prompts is not None and bar.n >= total_prompts:
            bar.close()
        return groups

    return sample_fn


def make_task_dataset(
    task_name: str,
    output: str | Path,
    *,
    model_name: str,
    kind: str = "paired",
    k: int = 4,
    num_prompts: int | None = None,
    seed: int = 0,
    bt_noise: float | None = None,
    split: str = "train",
    max_new_tokens: int = 48,
    batch_size: int = 16,
    chat_template: str = "auto",
    task_settings: dict[str, Any] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    label_noise: float = 0.0,
    source_set: str = "default",
) -> Path:
    """``distalign data make``: sample from ``model_name`` (or the already loaded ``model``/``tokenizer``),
    build ``kind`` rows of task ``task_name`` and write them as JSONL with a provenance sidecar.

    With the chat template in use the rows are conversational, so training renders them exactly as they
    were sampled. ``kind="shift"`` builds pairs from a mixture of response sources (``tasks/shift.py``,
    the set named ``source_set``), with ``label_noise`` of them flipped. Bad settings raise
    :class:`~distalign.config.ConfigError` naming the option.
    """
    from distalign.errors import ConfigError
    from distalign.tasks.base import get_task
    from distalign.tasks.make import KINDS, make_dataset
    from distalign.tasks.shift import SOURCE_SETS

    if kind not in (*KINDS, "shift"):
        raise ConfigError(f"--kind {kind!r} is not valid; choose one of {', '.join((*KINDS, 'shift'))}")
    try:
        task = get_task(task_name, **(task_settings or {}))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    available = len(task.prompts(split))  # type: ignore[arg-type]
    if num_prompts is not None and not 0 < num_prompts <= available:
        raise ConfigError(f"--num-prompts {num_prompts}: task {task_name!r} has {available} {split} prompts")
    if kind != "prompt" and k < 2:
        raise ConfigError(f"--k {k}: a preference pair needs at least 2 completions per prompt")
    if bt_noise is not None and bt_noise <= 0:
        raise ConfigError(f"--bt-noise {bt_noise} must be a positive temperature")
    if source_set not in SOURCE_SETS:
        raise ConfigError(f"--sources {source_set!r} is not valid; choose one of {', '.join(SOURCE_SETS)}")
    if model is None and kind != "prompt":
        from distalign.models.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_name)
        model = model.to(model_device())
    # Prompt-only rows load no model, so "auto" cannot see a template there: only "on" makes them chat rows.
    use_chat = (
        uses_chat_template(tokenizer, chat_template) if tokenizer is not None else chat_template == "on"
    )
    if kind == "shift":
        return _make_shift_dataset(
            task,
            output,
            model,
            tokenizer,
            model_name=model_name,
            use_chat=use_chat,
            k=k,
            seed=seed,
            num_prompts=num_prompts or available,
            label_noise=label_noise,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            split=split,
            source_set=source_set,
        )
    sample_fn = None
    if kind != "prompt":
        sample_fn = model_sample_fn(
            model,
            tokenizer,
            task,
            use_chat_template=use_chat,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            total_prompts=num_prompts or available,
            description=f"data: sampling {k} per prompt",
        )
    return make_dataset(
        task,
        output,
        sample_fn=sample_fn,
        kind=kind,
        k=k,
        seed=seed,
        bt_noise=bt_noise,
        num_prompts=num_prompts,
        split=split,  # type: ignore[arg-type]
        conversational=use_chat,
        model=model_name,
        sampling={
            "method": "ancestral, temperature 1, no top-k/top-p",
            "max_new_tokens": max_new_tokens,
            "sampler_seed": seed,
            "batch_size": batch_size,
            "chat_template": use_chat,
        },
    )


def _make_shift_dataset(
    task: Task,
    output: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    use_chat: bool,
    k: int,
    seed: int,
    num_prompts: int,
    label_noise: float,
    max_new_tokens: int,
    batch_size: int,
    split: str,
    source_set: str,
) -> Path:
    """Pairs from the mixture of the named source set (:data:`~distalign.tasks.shift.SOURCE_SETS`),
    written with provenance."""
    from distalign.errors import ConfigError
    from distalign.tasks.builders import to_conversational
    from distalign.tasks.io import write_jsonl_with_provenance
    from distalign.tasks.shift import SOURCE_SETS, build_shift_dataset, shift_provenance, source_task

    if not use_chat:
        # The style sources speak through a system prompt or a hidden instruction in the user turn.
        raise ConfigError("--kind shift needs a model with a chat template (e.g. --model smollm2)")
    if not 0.0 <= label_noise < 0.5:
        raise ConfigError(f"--label-noise {label_noise} must lie in [0, 0.5)")
    sources = SOURCE_SETS[source_set]
    samplers = {
        source.name: model_sample_fn(
            model,
            tokenizer,
            source_task(task, source),
            use_chat_template=True,
            max_new_tokens=max_new_tokens,
            seed=seed + index,
            batch_size=batch_size,
            description=f"data: sampling source {source.name!r}",
            temperature=source.temperature,
        )
        for index, source in enumerate(sources)
    }
    rows, counts = build_shift_dataset(
        task,
        samplers,
        sources=sources,
        k=k,
        seed=seed,
        num_prompts=num_prompts,
        label_noise=label_noise,
        split=split,  # type: ignore[arg-type]
    )
    provenance = shift_provenance(
        task,
        sources,
        model=model_name,
        sampling={"method": "ancestral per source temperature", "max_new_tokens": max_new_tokens},
        seed=seed,
        settings={"k": k, "num_prompts": num_prompts, "label_noise": label_noise, "split": split},
        counts=counts,
    )
    return write_jsonl_with_provenance(to_conversational(task, rows), output, provenance)
