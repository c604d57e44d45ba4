"""Model cards: the ``README.md`` of a run's final model, as Hugging Face tooling expects one.

``RUN/final/README.md`` (and, for a LoRA run, ``RUN/final/adapter/README.md``) opens with YAML front
matter written by huggingface_hub's ``ModelCardData`` (``base_model`` when the base has a public id,
``library_name`` ``transformers`` or ``peft`` for the adapter, ``pipeline_tag``, ``tags: [distalign,
<method>]``), then says what the model is: its base (and, for the embedded SmolLM2, that its weights
are de-quantised from a GGUF file), the method with its options and papers, the data it saw (path,
rows, fingerprint), the training settings, the evaluation when there is one, and the commands that
reproduce it.

:func:`build_model_card` is pure: config + :class:`TrainingRecord` + optional evaluation -> markdown.
Training writes the card inside the atomic save of ``final/`` with the record beside it
(``final/distalign_training.json``); ``distalign eval RUN`` rewrites it with the new evaluation
(:func:`refresh_model_card`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distalign.config import RunConfig, load_config
from distalign.models.loading import public_model_id
from distalign.train.card_sections import (
    data_lines,
    describe_base_model,
    evaluation_lines,
    method_lines,
    reference_line,
    shell_command,
    training_lines,
)
from distalign.train.record import TrainingRecord

if TYPE_CHECKING:  # named in annotations only
    from distalign.stats.metrics import EvalResult

CARD = "README.md"


def build_model_card(
    config: RunConfig,
    record: TrainingRecord | None,
    evaluation: EvalResult | None = None,
    *,
    eval_overrides: Sequence[str] = (),
    adapter: bool = False,
) -> str:
    """The model card (markdown with YAML front matter) of the run ``config`` describes.

    ``record``: what the run trained on (None for a run saved without one: rows and fingerprint are
    then "not recorded"); ``evaluation``: the run's ``eval/eval.json``, if any, made with the config
    overrides ``eval_overrides``; ``adapter``: the card of ``final/adapter`` (``library_name: peft``)
    rather than of the merged model in ``final/``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    method = config.online.method if config.online is not None else config.loss.name
    run = config.output_dir
    again = f"{run.rstrip('/')}-again"
    eval_command = shell_command("distalign", "eval", run, *eval_overrides)
    lora = config.model.lora
    merged = not lora.enabled or lora.save_merged  # else final/ holds the adapter and no weights
    front = ModelCardData(
        base_model=public_model_id(config.model.name),
        library_name="peft" if adapter or not merged else "transformers",
        pipeline_tag="text-generation",
        tags=["distalign", method],
    )
    if adapter:
        loading = (
            "This folder holds the LoRA adapter alone: load it with peft on top of the base model "
            "(`adapter_config.json` names it)"
            + ("; the folder above holds the merged weights." if merged else ".")
        )
    elif not merged:
        loading = (
            "The LoRA adapter alone is in `adapter/`: load it with peft on top of the base model (no "
            "merged copy was saved: `model.lora.save_merged: false`; `distalign eval` merges it in memory)."
        )
    else:
        loading = "This folder loads with `transformers.AutoModelForCausalLM.from_pretrained`" + (
            "; the LoRA adapter alone is in `adapter/`." if config.model.lora.enabled else "."
        )
    versions = ", ".join(f"{k} {v}" for k, v in record.versions.items()) if record else "not recorded"
    body = [
        f"# {Path(run).name}: `{method}` on `{config.model.name}`",
        "",
        f"Trained with distalign; run directory `{run}`. {loading}",
        "",
        "## Base model",
        "",
        *describe_base_model(config),
        "",
        "## Method",
        "",
        *method_lines(config),
        reference_line(config),
        "- Equations and option meanings: docs/paper_index.md in the distalign sources",
        "",
        "## Data",
        "",
        *data_lines(config, record),
        "",
        "## Training",
        "",
        *training_lines(config, record),
        "",
        "## Evaluation",
        "",
        *evaluation_lines(evaluation, eval_command),
        "",
        "## Reproduce",
        "",
        "```bash",
        "# evaluate this model" + (" (the numbers above)" if evaluation is not None else ""),
        eval_command,
        "# train it again from the config saved with the run, into a new directory, and evaluate that",
        shell_command("distalign", "train", f"{run.rstrip('/')}/config.yaml", f"output_dir={again}"),
        shell_command("distalign", "eval", again, *eval_overrides),
        "```",
        "",
        f"Training into `{run}` itself finds the finished run and does nothing (`--overwrite-output-dir` "
        "trains it again from step 0 and deletes this model and its evaluation). Runs are seeded "
        f"(`train.seed`); paths in the config are relative to the directory training was started from. "
        f"Versions: {versions}.",
    ]
    return str(ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def write_model_card(
    final_dir: str | Path,
    config: RunConfig,
    record: TrainingRecord | None,
    evaluation: EvalResult | None = None,
    *,
    eval_overrides: Sequence[str] = (),
) -> Path:
    """Write ``final_dir/README.md`` (and ``final_dir/adapter/README.md`` when there is an adapter,
    replacing peft's template, which names the base by its local path). Returns the main card's path."""
    final_dir = Path(final_dir)
    card = final_dir / CARD
    options = {"eval_overrides": eval_overrides}
    card.write_text(build_model_card(config, record, evaluation, **options), encoding="utf-8")
    if (final_dir / "adapter").is_dir():
        text = build_model_card(config, record, evaluation, adapter=True, **options)
        (final_dir / "adapter" / CARD).write_text(text, encoding="utf-8")
    return card


def refresh_model_card(
    run_dir: str | Path, evaluation: EvalResult | None, eval_overrides: Sequence[str] = ()
) -> Path | None:
    """Rewrite ``RUN/final``'s card with ``evaluation`` (what ``distalign eval RUN`` just wrote); the
    rest comes from ``RUN/config.yaml`` and ``final/distalign_training.json``. None without ``final/``."""
    run_dir = Path(run_dir)
    final_dir = run_dir / "final"
    if not final_dir.is_dir():
        return None
    config = load_config(run_dir / "config.yaml")
    record = TrainingRecord.load(final_dir)
    return write_model_card(final_dir, config, record, evaluation, eval_overrides=eval_overrides)
