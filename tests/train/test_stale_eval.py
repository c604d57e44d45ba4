"""Training a new model into a run directory deletes the evaluation of the earlier one (``RUN/eval``),
so neither ``distalign report`` nor the model card shows numbers of a model that is gone."""

from __future__ import annotations

import shutil

from distalign.eval.run_dir import load_run

STEPS = ("train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4")


def _fake_evaluation(run_dir):
    """An ``eval/`` as ``distalign eval`` leaves it (only its presence matters here)."""
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text("{}")
    (run_dir / "eval" / "gold_reward_histogram.png").write_bytes(b"png")


def test_overwrite_output_dir_deletes_the_earlier_evaluation(run_tiny):
    run = run_tiny(*STEPS)
    _fake_evaluation(run)
    run_tiny(*STEPS, "loss.beta=0.3", "train.overwrite_output_dir=true")
    assert not (run / "eval").exists()
    summary = load_run(run)
    assert summary.eval is None and not any("eval" in str(png) for png in summary.pngs)
    assert "Not evaluated yet" in (run / "final" / "README.md").read_text()


def test_a_new_final_model_deletes_an_evaluation_left_in_the_directory(run_tiny, capsys):
    """A run trained again after its final/ was deleted (no --overwrite-output-dir: same config, so it
    starts over in place) must not keep the evaluation of the deleted model."""
    run = run_tiny(*STEPS)
    _fake_evaluation(run)
    shutil.rmtree(run / "final")
    capsys.readouterr()
    run_tiny(*STEPS)
    assert not (run / "eval").exists() and (run / "final" / "README.md").is_file()
    assert "it evaluated an earlier model" in capsys.readouterr().err
    assert load_run(run).eval is None
