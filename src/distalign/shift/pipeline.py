"""From a data file to density ratios: validate, embed (cached), fit (cached), summarise, write.

Cache layout (under ``distalign.cache.cache_root()``: ``--cache-dir``, ``$DISTALIGN_CACHE`` or
``~/.cache/distalign``), each entry built in a temporary directory and renamed into place with a
``COMPLETE`` marker (``models.cache.build_once``):

```
shift/embeddings-<texts>-<encoder>/embeddings.safetensors   float32 [N, d], one row per data row
shift/fit-<data>-<settings>/model.json                      target, proportions, settings, and per
                                                            source: gamma, calibration, held-out report
shift/fit-<data>-<settings>/classifiers.safetensors         probe arrays (mean, scale, coef, intercept
                                                            and C; none for a fine-tuned classifier)
                                                            and isotonic thresholds, float64
shift/fit-<data>-<settings>/rows.safetensors                calibrated c_i [N, k] and the held-out mask
```

``<texts>`` hashes the scored texts (row by row), ``<encoder>`` every file of the embedding model,
``<data>`` the texts and the per-row sources, ``<settings>`` the fit settings (target, proportions,
calibration, split, C, bins, scheme), the encoder and the classifier kind — or, for ``--classifier
hf:MODEL``, the fine-tuned model's files (no embeddings are computed) and the fine-tuning settings —
16 hex digits each. A fine-tuned model's weights are not kept: its values on the data's rows are. Nothing is
pickled: arrays are safetensors, everything else JSON. A complete entry that cannot be read back (a
truncated or edited file, arrays of the wrong shape) is removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from distalign.cache import build_once, cache_root, remove_directory, settings_key
from distalign.data.formats import DataError
from distalign.errors import SetupError
from distalign.shift.features import (
    MINILM,
    MINILM_PACKAGE,
    SentenceEmbedder,
    embed_rows,
    embedding_model_dir,
    model_dir_fingerprint,
    row_texts,
    texts_fingerprint,
)
from distalign.shift.finetune import (
    FinetuneSettings,
    describe,
    finetune_scorer,
    is_finetuned,
    resolve_model_dir,
)
from distalign.shift.fit import (
    FORMAT_VERSION,
    FitSettings,
    ShiftModel,
    check_sources,
    fit_scored,
    logistic_scorer,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

SUMMARY_FILE = "shift_summary.json"
PLOT_FILE = "reliability.png"
LOGISTIC = "logistic"
_ROWS_FILE = "rows.safetensors"


@dataclass(frozen=True)
class FeatureOptions:
    """What is embedded, and with what, or what is fine-tuned (all but ``device`` / ``batch_size`` enter
    the cache keys)."""

    response: str = "preferred"
    with_prompt: bool = True
    embedding_model: str = MINILM
    classifier: str = LOGISTIC
    device: str | None = None
    batch_size: int = 32
    finetune: FinetuneSettings = FinetuneSettings()  # hf:MODEL classifiers only

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SetupError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class PreparedData:
    """A validated data file: its rows, each row's source and the texts the classifier scores."""

    loaded: Any  # distalign.data.loading.LoadedData
    sources: list[str]
    texts: list[list[str]]
    proportions: dict[str, float]


def _check_classifier(kind: str) -> None:
    if is_finetuned(kind):
        resolve_model_dir(kind)  # SetupError naming the model when there is none
    elif kind != LOGISTIC:
        raise SetupError(f"--classifier {kind!r}: valid: {LOGISTIC}, hf:minilm, hf:DIR or hf:ORG/NAME")


def _row_number(loaded: Any, index: int) -> int:
    numbers = getattr(loaded, "row_numbers", None)  # the file's own numbering, where the loader keeps it
    return int(numbers[index]) if numbers is not None else index + 1


def prepare(
    path: str | Path, settings: FitSettings, options: FeatureOptions, *, format: str = "auto"
) -> PreparedData:
    """Load and validate ``path`` for density-ratio fitting; every user error is raised here, before
    anything is embedded or written (DataError with file/row/field, SetupError for settings)."""
    from distalign.data.loading import load_rows

    _check_classifier(options.classifier)
    loaded = load_rows(path, format=format)
    if loaded.format == "prompt":
        raise DataError(
            "prompt-only rows have no responses to score: distalign shift needs paired, unpaired or "
            "listwise rows with a `source` column",
            file=loaded.path,
        )
    missing = [
        DataError(
            "missing source: every row must name where its response(s) came from",
            file=loaded.path,
            row=_row_number(loaded, index),
            field="source",
        )
        for index, row in enumerate(loaded.rows)
        if row.get("source") is None
    ]
    if missing:
        raise DataError.collected(missing[:20], file=loaded.path, truncated=len(missing) > 20)
    sources = [str(row["source"]) for row in loaded.rows]
    try:
        proportions = check_sources(sources, settings)
    except SetupError as err:
        raise SetupError(f"{loaded.path}: {err}") from None
    texts = row_texts(loaded.rows, loaded.format, response=options.response, with_prompt=options.with_prompt)
    return PreparedData(loaded, sources, texts, proportions)


@dataclass
class ShiftResult:
    """A fitted (or cached) density-ratio model and its values on every row of the data."""

    model: ShiftModel
    data: PreparedData
    probabilities: np.ndarray
    density_ratio: np.ndarray
    heldout: np.ndarray
    cache_dir: Path
    from_cache: bool
    provenance: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The JSON summary: data, mixture, per-source classifier reports and density-ratio statistics."""
        model, h = self.model, self.density_ratio
        sources = np.asarray(self.data.sources, dtype=object)
        per_source = {}
        for name, proportion in model.proportions.items():
            rows = sources == name
            per_source[name] = {
                "rows": int(rows.sum()),
                "proportion": proportion,
                "density_ratio_mean": float(h[rows].mean()),
                "density_ratio_min": float(h[rows].min()),
                "density_ratio_max": float(h[rows].max()),
                "density_ratio_mean_train_rows": _mean_or_none(h[rows & ~self.heldout]),
                "density_ratio_mean_heldout_rows": _mean_or_none(h[rows & self.heldout]),
            }
        mixture_mean = sum(
            model.proportions[name] * per_source[name]["density_ratio_mean"] for name in per_source
        )
        return {
            **self.provenance,
            "rows": len(h),
            "format": self.data.loaded.format,
            "target": model.target,
            "alpha": model.proportions[model.target],
            "bound": model.bound,
            "sources": per_source,
            "classifiers": {
                name: {"gamma": fit.gamma, **fit.report} for name, fit in sorted(model.fits.items())
            },
            "scheme": model.report,
            "density_ratio": {
                "mean_over_mixture": mixture_mean,
                "min": float(h.min()),
                "max": float(h.max()),
                "fraction_at_bound": float((h >= model.bound * (1 - 1e-9)).mean()),
                "note": "E_P[h] = 1 for the exact ratio: mean_over_mixture (sum over sources of proportion "
                "x mean h of its rows) far from 1 signals a miscalibrated classifier; train rows are scored "
                "in-sample, so compare their mean with the held-out rows'",
            },
            # Relative to the distalign cache (--cache-dir, $DISTALIGN_CACHE or ~/.cache/distalign), so
            # a summary kept as a result names no machine's paths.
            "cache_entry": f"{self.cache_dir.parent.name}/{self.cache_dir.name}",
            "from_cache": self.from_cache,
        }


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _cached(entry: Path, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(entry)``, building the entry first unless it is complete; an entry that is complete but
    unreadable (a truncated or edited file) is removed and rebuilt once."""
    build_once(entry, build)
    try:
        return load(entry)
    except Exception as err:  # whatever a damaged file raises (safetensors, JSON, shapes): rebuild
        logger.warning("cache entry %s is unreadable (%s); rebuilding it", entry, err)
        remove_directory(entry)
        build_once(entry, build)
        return load(entry)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _embeddings(
    data: PreparedData,
    encoder_dir: Path,
    encoder_fp: str,
    options: FeatureOptions,
    root: Path,
    progress: bool,
) -> np.ndarray:
    from safetensors.numpy import load_file, save_file

    entry = root / f"embeddings-{texts_fingerprint(data.texts)[:16]}-{encoder_fp[:16]}"

    def build(staging: Path) -> None:
        embedder = SentenceEmbedder(encoder_dir, device=options.device, batch_size=options.batch_size)
        features = embed_rows(embedder, data.texts, progress=progress)
        save_file({"embeddings": features}, staging / "embeddings.safetensors")

    def load(directory: Path) -> np.ndarray:
        features = load_file(directory / "embeddings.safetensors")["embeddings"]
        if features.ndim != 2 or len(features) != len(data.texts):
            raise ValueError(f"{features.shape} embeddings for {len(data.texts)} rows")
        return features

    return _cached(entry, build, load)


def fit_shift(
    path: str | Path,
    settings: FitSettings,
    options: FeatureOptions = FeatureOptions(),
    *,
    format: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ShiftResult:
    """Validate ``path``, then load the fitted density-ratio model from the cache or fit it (embedding
    the texts, themselves cached), and evaluate it on every row."""
    from safetensors.numpy import load_file, save_file

    data = prepare(path, settings, options, format=format)
    finetuned = is_finetuned(options.classifier)
    # The classifier's model: the fine-tuned one, or the encoder whose embeddings the probe reads.
    model_dir = (
        resolve_model_dir(options.classifier) if finetuned else embedding_model_dir(options.embedding_model)
    )
    model_fp = model_dir_fingerprint(model_dir)
    root = cache_root(cache_dir) / "shift"
    data_key = _digest(texts_fingerprint(data.texts), *data.sources)
    key: dict[str, Any] = {"fit": settings.to_json(), "format_version": FORMAT_VERSION}
    if finetuned:  # the model's files, not its name, decide the result; the probe's C plays no part
        key["fit"].pop("C")
        key |= {"classifier": "hf", "model": model_fp, "finetune": options.finetune.to_json()}
    else:
        key |= {"classifier": options.classifier, "encoder": model_fp}
    entry = root / f"fit-{data_key}-{settings_key(key)}"
    built = False

    def build(staging: Path) -> None:
        nonlocal built
        if finetuned:
            scorer = finetune_scorer(
                model_dir, data.texts, options.finetune, device=options.device, progress=progress
            )
        else:
            scorer = logistic_scorer(_embeddings(data, model_dir, model_fp, options, root, progress))
        model, heldout, probabilities = fit_scored(scorer, data.sources, settings)
        model.save(staging)
        save_file(
            {"probabilities": probabilities, "heldout": heldout.astype(np.float64)}, staging / _ROWS_FILE
        )
        built = True

    def load(directory: Path) -> tuple[ShiftModel, dict[str, np.ndarray]]:
        model = ShiftModel.load(directory)
        arrays = load_file(directory / _ROWS_FILE)
        expected = (len(data.sources), len(model.synthetic))
        if arrays["probabilities"].shape != expected or arrays["heldout"].shape != expected[:1]:
            raise ValueError(f"row arrays of shape {arrays['probabilities'].shape}, expected {expected}")
        return model, arrays

    model, arrays = _cached(entry, build, load)
    probabilities = arrays["probabilities"]
    text: dict[str, Any] = {"response": options.response, "with_prompt": options.with_prompt}
    if finetuned:
        text["finetuned"] = describe(options.classifier, model_dir, model_fp, options.finetune)
    else:
        text |= {
            "embedding_model": options.embedding_model,
            # Where the encoder lies, portably: inside its package, or the directory as the user gave it.
            "encoder_dir": f"{MINILM_PACKAGE}/model" if options.embedding_model == MINILM else str(model_dir),
            "encoder_fingerprint": model_fp,
            "pooling": "mean over non-padding tokens, L2-normalised",
        }
    provenance = {
        "data": data.loaded.path,
        "data_fingerprint": data.loaded.fingerprint,
        "proportions_from": "data" if settings.proportions is None else "given",
        "text": text,
        "classifier": options.classifier,
        "settings": settings.to_json(),
    }
    return ShiftResult(
        model=model,
        data=data,
        probabilities=probabilities,
        density_ratio=model.ratio_from_probabilities(probabilities),
        heldout=arrays["heldout"] > 0.5,
        cache_dir=entry,
        from_cache=not built,
        provenance=provenance,
    )


def write_fit_outputs(result: ShiftResult, output_dir: str | Path) -> tuple[Path, Path]:
    """``OUTPUT_DIR/shift_summary.json`` and ``OUTPUT_DIR/reliability.png``, each written atomically
    (the plot first, the summary last)."""
    from distalign.shift.calibration import plot_reliability
    from distalign.tasks.io import atomic_write  # temp file + fsync + rename

    output = Path(output_dir)
    title = f"held-out reliability of P({result.model.target} | text), {Path(result.data.loaded.path).name}"
    target = result.model.target
    curves = {f"{target} vs {name}": bins for name, bins in result.model.reliability().items()}
    plot = plot_reliability(curves, output / PLOT_FILE, title=title)
    summary = output / SUMMARY_FILE
    atomic_write(summary, json.dumps(result.summary(), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return summary, plot


def write_scored_data(result: ShiftResult, output: str | Path) -> Path:
    """The data rows (as ``load_rows`` normalises them) with ``density_ratio`` set on every row, as
    JSONL, and a provenance sidecar ``OUTPUT.provenance.json`` holding the summary; both atomic."""
    from distalign.tasks.io import write_jsonl_with_provenance

    rows = [
        {**row, "density_ratio": float(value)}
        for row, value in zip(result.data.loaded.rows, result.density_ratio)
    ]
    provenance = {"command": "distalign shift score", "shift": result.summary()}
    return write_jsonl_with_provenance(rows, output, provenance)
