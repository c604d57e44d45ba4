"""Quiet logs and sensible defaults: no deprecated calls from distalign into transformers / peft, no
per-load progress bars from transformers, data written under runs/data by default, a truncation line
that names the limit to raise, and the tiny model's eval marked as a plumbing check."""

from __future__ import annotations

import contextlib
import logging
import traceback
import warnings
from pathlib import Path

import pytest

import distalign
from distalign.cli import main

SRC = str(Path(distalign.__file__).resolve().parent)


def _is_distalign(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(SRC)


def _is_call_plumbing(frame: traceback.FrameSummary) -> bool:
    """nn.Module.__call__ and peft's pass-through ``forward`` wrappers between our call and the model."""
    path = Path(frame.filename).as_posix()
    return path.endswith("torch/nn/modules/module.py") or ("/peft/" in path and frame.name == "forward")


def _caller(stack: list[traceback.FrameSummary], index: int) -> traceback.FrameSummary:
    """The frame that made the call at ``stack[index]``, looking through call plumbing."""
    while index > 0 and _is_call_plumbing(stack[index]):
        index -= 1
    return stack[index]


@contextlib.contextmanager
def deprecations_from_our_calls():
    """Collect DeprecationWarning / FutureWarning (Python warnings) and transformers' deprecation log
    lines whose offending call is in distalign's source.

    A Python warning's location (``stacklevel``) names the call that used the deprecated API; when that
    is nn.Module plumbing (``model(past_key_values=...)``) or peft passing kwargs on, the call it stands
    for is found on the stack. transformers logs some deprecations with no caller: those count when
    nothing but transformers, torch's Module plumbing and peft's forward wrappers lies between the
    innermost distalign frame and the log call (a library warning about its own internals is theirs).
    """
    found: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, (DeprecationWarning, FutureWarning)):
            return
        stack = traceback.extract_stack()[:-1]
        at = [i for i, f in enumerate(stack) if f.filename == filename and f.lineno == lineno]
        origin = _caller(stack, at[-1]).filename if at else filename
        if _is_distalign(origin):
            found.append(f"{category.__name__}: {message} (called from {origin})")

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecated" not in record.getMessage():
                return
            stack = traceback.extract_stack()[:-1]
            ours = [i for i, f in enumerate(stack) if _is_distalign(f.filename)]
            if not ours:
                return
            between = stack[ours[-1] + 1 :]
            if all(
                _is_call_plumbing(f) or "/transformers/" in f.filename or "/logging/" in f.filename
                for f in between
            ):
                found.append(
                    f"transformers log: {record.getMessage()} (called from {stack[ours[-1]].filename})"
                )

    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers")
    handler = Handler(level=logging.WARNING)
    # warning_once remembers what it printed in this process; forget, so this test sees every message.
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield found
    finally:
        logger.removeHandler(handler)


def test_a_tiny_pipeline_makes_no_deprecated_calls(tmp_path):
    from distalign.models.loading import LoraSettings, load_model_and_tokenizer
    from distalign.models.sampling import sample_completions, score_completions

    run = tmp_path / "run"
    with deprecations_from_our_calls() as found:
        argv = ["train", "configs/quickstart.yaml", f"output_dir={run}", "train.max_steps=2"]
        assert main([*argv, "model.lora.enabled=true", "train.log_every=1"]) == 0
        for lora in (None, LoraSettings()):
            model, tokenizer = load_model_and_tokenizer("tiny", lora=lora)
            samples = sample_completions(
                model, tokenizer, ["Review: the soup."], num_samples=2, max_new_tokens=6
            )
            score_completions(model, tokenizer, samples.prompts, samples.completion_ids)
    assert found == []


def test_the_check_sees_a_deprecated_call(monkeypatch):
    """The check above can fail: sampling through the pre-5.x cache keyword is caught."""
    from distalign.models import sampling
    from distalign.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    if sampling._cache_keyword(model) == "past_key_values":
        pytest.skip("this transformers still takes past_key_values")
    monkeypatch.setattr(sampling, "_cache_keyword", lambda model: "past_key_values")
    with deprecations_from_our_calls() as found:
        sampling.sample_completions(model, tokenizer, ["Review:"], max_new_tokens=3)
    assert found and all("past_key_values" in line and "sampling.py" in line for line in found)
    assert any(line.startswith("FutureWarning") for line in found)
    assert any(line.startswith("transformers log") for line in found)


def test_loading_and_saving_print_no_transformers_progress_bars(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from distalign.models.loading import load_model_and_tokenizer
    from distalign.models.saved import save_final_model

    hf_logging.enable_progress_bar()
    model, tokenizer = load_model_and_tokenizer("tiny")
    save_final_model(model, tokenizer, tmp_path / "saved")
    load_model_and_tokenizer(str(tmp_path / "saved"))
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()  # the user's own setting is restored


def test_data_make_writes_under_runs_data_by_default(tmp_path, monkeypatch, capsys):
    from distalign.tasks.make import default_output_path

    monkeypatch.chdir(tmp_path)
    argv = ["data", "make", "keyword", "--model", "tiny", "--num-prompts", "2", "--k", "2"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    written = Path("runs/data/keyword_paired.jsonl")
    assert default_output_path("keyword", "paired") == written
    assert written.is_file() and written.with_suffix(".provenance.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing loose in the working directory
    assert f"wrote {written}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "make", "--help"])
    assert "runs/data/TASK_KIND.jsonl" in " ".join(capsys.readouterr().out.split())


def test_truncation_line_names_the_count_the_limit_and_the_longest(tmp_path, capsys):
    from distalign.data.tokenize import apply_length_policy
    from distalign.data.tokenized import EncodedRow, TokenizationSettings

    rows = [EncodedRow(0, list(range(10)), [[1, 2]], "p"), EncodedRow(1, list(range(7)), [[1] * 9], "q")]
    _, report = apply_length_policy(rows, TokenizationSettings(max_length=12, max_prompt_length=6))
    line = report.summary("data.max_prompt_length", "data.max_length")
    assert (
        "truncated the prompt of 2 rows to data.max_prompt_length=6 tokens (longest prompt: 10 tokens; "
        "raise data.max_prompt_length to keep them whole)"
    ) in line
    assert "cut the completion of 1 row to fit data.max_length=12 tokens" in line
    assert "longest prompt + completion: 16 tokens; raise data.max_length" in line

    # What a training run prints, with the config keys to raise.
    run = tmp_path / "run"
    argv = ["train", "configs/quickstart.yaml", f"output_dir={run}", "train.max_steps=1"]
    assert main([*argv, "data.max_prompt_length=8", "data.limit=16"]) == 0
    printed = capsys.readouterr().out
    assert "truncated the prompt of 16 rows to data.max_prompt_length=8 tokens (longest prompt: " in printed


def test_the_quickstart_config_keeps_every_prompt_whole(capsys):
    from distalign.config import load_config
    from distalign.data.loading import load_rows
    from distalign.data.tokenize import tokenize_paired
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.train.setup import tokenization_settings

    config = load_config("configs/quickstart.yaml")
    _, tokenizer = load_model_and_tokenizer(config.model.name)
    _, report = tokenize_paired(load_rows(config.data.path).rows, tokenizer, tokenization_settings(config))
    assert report.prompt_truncated == report.completion_truncated == report.dropped_too_long == 0
    assert report.longest_prompt <= config.data.max_prompt_length


def test_eval_of_the_tiny_model_says_it_is_a_plumbing_check():
    from distalign.cli.evaluate import _eval_lines
    from distalign.stats.metrics import Estimate, EvalResult

    estimate = Estimate(0.1, 0.0, 0.2, 4)
    result = EvalResult("sentiment", "vader", 4, {"policy": estimate, "reference": estimate})
    assert "plumbing" not in _eval_lines(result)
    result.settings = {"policy": "runs/x/final", "reference": "tiny"}
    assert "randomly initialised test model" in _eval_lines(result)
    assert "plumbing" in _eval_lines(result)


def test_the_demo_announces_its_time_from_the_measured_phases():
    import dataclasses

    from distalign.demo.settings import MEASURED, PHASE_NAMES, SMOLLM2, TINY, estimate_line, estimated_seconds

    docs = " ".join(Path("docs/demo.md").read_text().split())
    for name, seconds in MEASURED["smollm2"].phases.items():  # the numbers docs/demo.md reports
        assert f"{PHASE_NAMES.get(name, name)} {seconds:g} /" in docs
    line = estimate_line(SMOLLM2)
    assert "about 8 minutes on 2 idle CPU cores" in line and "about 2.1 GB" in line
    assert "about 15 seconds" in estimate_line(TINY)
    longer = dataclasses.replace(SMOLLM2, steps=2 * SMOLLM2.steps)
    # twice the steps: the training phases once more
    training = MEASURED["smollm2"].phases["train_dpo"] + MEASURED["smollm2"].phases["train_aot"]
    assert estimated_seconds(longer) - estimated_seconds(SMOLLM2) == pytest.approx(training)
    assert "a GPU is used here" in estimate_line(SMOLLM2, "cuda")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)
def test_a_one_process_run_prints_nothing_from_deepspeed(tmp_path):
    """With DeepSpeed installed (the dev extra) a plain run on CPU printed DeepSpeed's "Setting
    accelerator to CPU" warning: saving the model imports DeepSpeed through transformers and accelerate.
    A fresh process, so that no earlier test has imported DeepSpeed already."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    args = ["configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "data.limit=8"]
    command = [
        sys.executable,
        "-m",
        "distalign",
        "train",
        *args,
        "train.batch_size=4",
        "train.micro_batch_size=4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "run saved to" in result.stdout
    assert "accelerator" not in result.stdout + result.stderr
