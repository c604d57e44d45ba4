"""A Hugging Face sequence-classifier score as a reward, from a local directory only (never downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distalign.rewards.base import REWARDS, Scorer, check_choice


def _directory_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the files in ``path``: retrained weights at the same path get a new cache key."""
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        entries.append((str(file.relative_to(path)), stat.st_size, int(stat.st_mtime)))
    return entries


def resolve_label(label: int | str | None, id2label: dict[int, str], num_labels: int) -> int | None:
    """Index of ``label`` (an index or a name from the model's ``id2label``); ``None`` for one-output models."""
    names = {str(name): int(idx) for idx, name in id2label.items()}
    if label is None:
        if num_labels == 1:
            return None
        raise ValueError(
            f"the classifier has {num_labels} labels; set label to one of {sorted(names)} or an index"
        )
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in names:
            raise ValueError(f"label {label!r} is not a label of the classifier; its labels: {sorted(names)}")
        return names[label]
    index = int(label)
    if not 0 <= index < num_labels:
        raise ValueError(f"label index {index} is out of range for a classifier with {num_labels} labels")
    return index


class ClassifierScorer:
    """Batched scorer over a local sequence classifier, loaded on first use (building a spec stays cheap)."""

    def __init__(
        self,
        model_dir: Path,
        label_index: int | None,
        *,
        score: str,
        input: str,
        batch_size: int,
        max_length: int,
        device: str,
    ) -> None:
        self.model_dir, self.label_index, self.score, self.input = model_dir, label_index, score, input
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.fingerprint_extra = {"files": _directory_fingerprint(model_dir)}
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, local_files_only=True)
            self._loaded = (tokenizer, model.to(self.device).eval())
        return self._loaded

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, num_labels] logits -> [B] scores of the chosen label."""
        if self.label_index is None:
            return logits[:, 0]
        if self.score == "probability":
            logits = logits.softmax(-1)
        elif self.score == "log_probability":
            logits = logits.log_softmax(-1)
        return logits[:, self.label_index]

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        tokenizer, model = self._load()
        outputs = []
        for start in range(0, len(completions), self.batch_size):
            texts = completions[start : start + self.batch_size]
            first, second = (
                (prompts[start : start + self.batch_size], texts)
                if self.input == "prompt_completion"
                else (texts, None)
            )
            enc = tokenizer(
                first, second, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            outputs.append(self._select(model(**enc.to(self.device)).logits.float()))
        return torch.cat(outputs).cpu()


@REWARDS.register("hf_classifier")
def hf_classifier(
    *,
    path: str,
    label: int | str | None = None,
    score: str = "probability",
    input: str = "completion",
    batch_size: int = 16,
    max_length: int = 512,
    device: str = "cpu",
) -> Scorer:
    """Score of a local ``AutoModelForSequenceClassification`` (loaded with ``local_files_only=True``).

    ``label``: the class whose score is returned, by index or by name from the model's ``id2label``
    (may be omitted for one-output regression heads). ``score``: "probability" (softmax, in [0, 1]),
    "log_probability" (log-softmax, nats) or "logit" (raw). ``input``: "completion" alone, or
    "prompt_completion" (encoded as a text pair). Never sets ``trust_remote_code``.
    """
    check_choice("score", score, ("probability", "log_probability", "logit"))
    check_choice("input", input, ("completion", "prompt_completion"))
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir():
        raise ValueError(
            f"hf_classifier path {path!r} is not a local directory (models are never downloaded)"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    label_index = resolve_label(label, dict(config.id2label or {}), int(config.num_labels))
    return ClassifierScorer(
        model_dir,
        label_index,
        score=score,
        input=input,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
    )
