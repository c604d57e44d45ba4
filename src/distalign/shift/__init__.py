"""Density ratios of a target ("golden") source against synthetic sources, for DoRA (docs/robust.md).

``distalign shift fit DATA --target NAME`` fits one golden-vs-source classifier per synthetic source
(a logistic probe on sentence embeddings, or with ``--classifier hf:MODEL`` a fine-tuned transformers
sequence classifier; ``--scheme multinomial``: one classifier over all sources instead) and reports
held-out accuracy and calibration;
``distalign shift score DATA --target NAME --output OUT.jsonl`` writes every row with its
``density_ratio``

    h = dQ_0 / dP = [ alpha + sum_i beta_i (1 - c_i) / (gamma_i c_i) ]^{-1}   (<= 1 / alpha)

which the ``dora`` and ``importance_weighted`` aggregators read. Modules: ``ratio`` (the formula and
the mixture proportions), ``calibration`` (ECE, reliability, temperature / isotonic scaling, the
plot), ``classifier`` (the probe, stored as arrays), ``features`` (the scored text and its embedding),
``finetune`` (the fine-tuned classifier), ``fit`` (classifier logits -> metrics, calibration, the
model), ``pipeline`` (data file -> cached fit -> outputs).
"""

from distalign.shift.finetune import FinetuneSettings
from distalign.shift.fit import FitSettings, ShiftModel, fit_density_ratio, fit_scored
from distalign.shift.pipeline import FeatureOptions, fit_shift, write_fit_outputs, write_scored_data
from distalign.shift.ratio import density_ratio, parse_proportions, resolve_proportions

__all__ = [
    "FeatureOptions",
    "FinetuneSettings",
    "FitSettings",
    "ShiftModel",
    "density_ratio",
    "fit_density_ratio",
    "fit_scored",
    "fit_shift",
    "parse_proportions",
    "resolve_proportions",
    "write_fit_outputs",
    "write_scored_data",
]
