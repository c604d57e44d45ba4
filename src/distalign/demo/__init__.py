"""``distalign demo``: the main job, end to end on the embedded model, with no network.

1. sample completions of the "sentiment" task's training prompts from the base model and pair the
   best against the worst by the gold reward (VADER compound sentiment);
2. train DPO and paired AOT on those pairs with identical settings (LoRA on SmolLM2 by default);
3. evaluate the reference (the base model), DPO and AOT on held-out prompts: gold reward, win rate
   against the reference, KL(policy || reference), quantile (dominance) curves, diversity, length;
4. write the HTML report comparing the runs, and print a table.

Everything is a library call (``make_task_dataset``, ``train_offline``, ``evaluate_models``,
``write_report``); the runs it leaves behind are ordinary run directories that ``distalign eval`` and
``distalign report`` accept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distalign.demo.settings import SMOLLM2, TINY, DemoSettings, estimate_line
from distalign.stats.metrics import Estimate

MARKER = ".distalign-demo"
#: What the demo writes into its output directory (and replaces on a rerun).
DEMO_OUTPUTS = ("data", "dpo", "aot", "report.html", "report_files", "demo_summary.json")


@dataclass
class DemoSummary:
    """What the demo measured: the table rows, phase times (wall and CPU seconds, with the machine's
    load average) and where things are."""

    table: list[dict[str, Any]]
    timings: dict[str, float]
    report: str
    runs: dict[str, str]
    data: dict[str, Any]
    settings: dict[str, Any]


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir``, or use it if it exists and is empty; a previous demo's outputs there are
    replaced, a directory holding anything else (or a file at that path) is refused."""
    from distalign.errors import SetupError

    if output_dir.exists() and not output_dir.is_dir():
        raise SetupError(f"{output_dir} is a file, not a directory; choose another --output-dir")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MARKER).exists():
            raise SetupError(
                f"{output_dir} exists and was not written by `distalign demo`; choose another --output-dir"
            )
        for name in DEMO_OUTPUTS:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text("written by distalign demo; its outputs here are replaced on a rerun\n")


def run_config(settings: DemoSettings, loss: str, data_path: Path, output_dir: Path, eval_cfg: dict):
    """The run config of one demo arm; DPO and AOT differ only in ``loss.name`` (and AOT's cost)."""
    from distalign.config import build_config

    loss_section: dict[str, Any] = {"name": loss, "beta": settings.beta}
    if loss == "aot_paired":
        loss_section.update(cost="logistic")
    tree = {
        "output_dir": str(output_dir),
        "model": {
            "name": settings.model,
            "lora": {
                "enabled": settings.lora,
                "r": settings.lora_r,
                "alpha": 2 * settings.lora_r,
                "target_modules": "all-linear",
                # The adapter (a few MB) is all the demo's evaluation and report need; a merged copy
                # would write the whole model again per arm (540 MB each for SmolLM2).
                "save_merged": False,
            },
        },
        "data": {
            "path": str(data_path),
            "max_length": settings.max_length,
            "max_prompt_length": settings.max_prompt_length,
            "packing": settings.packing,
        },
        "loss": loss_section,
        "train": {
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "micro_batch_size": settings.micro_batch_size,
            "no_grad_micro_batch_size": settings.no_grad_micro_batch_size,
            "max_steps": settings.steps,
            "lr": settings.lr,
            "scheduler": "cosine",
            "warmup_ratio": 0.1,
            "log_every": 1,
        },
        "eval": eval_cfg,
    }
    return build_config(tree, source=f"demo ({loss})")


def eval_section(settings: DemoSettings) -> dict[str, Any]:
    """The `eval:` config section of a demo arm (also what the demo evaluates with)."""
    return {
        "task": "sentiment",
        "num_prompts": settings.eval_prompts,
        "samples_per_prompt": settings.eval_samples_per_prompt,
        "max_new_tokens": settings.eval_max_new_tokens,
        "batch_size": settings.sample_batch_size,
        "seed": settings.seed,
    }


def _phase(number: int, message: str) -> None:
    print(f"\n[{number}/6] {message}", flush=True)


class Stopwatch:
    """Wall and CPU seconds (all threads of this process) per named phase; the machine's load average
    is recorded too, because on a shared machine wall time says as much about the neighbours as about
    the demo."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._started = (time.perf_counter(), time.process_time())
        self.load_at_start = _load_average()

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall, 1)
        self.cpu[name] = round(time.process_time() - cpu, 1)

    def summary(self) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self._started[0], time.process_time() - self._started[1]
        return {
            **self.wall,
            "total": round(wall, 1),
            "cpu_seconds": {**self.cpu, "total": round(cpu, 1)},
            "load_average_1min": {"start": self.load_at_start, "end": _load_average()},
            "cpu_threads": _torch_threads(),
        }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on every platform
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_demo(output_dir: str | Path, *, tiny: bool = False, steps: int | None = None) -> DemoSummary:
    """Run the demo into ``output_dir`` and return its summary (also written as demo_summary.json)."""
    from distalign.eval.report import write_report
    from distalign.memory import release_freed_memory
    from distalign.tasks.sampler import model_device

    settings = TINY if tiny else SMOLLM2
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps)
    output_dir = Path(output_dir)
    prepare_output_dir(output_dir)
    clock = Stopwatch()

    estimate = estimate_line(settings, str(model_device().type))
    if estimate is not None:
        print(f"distalign demo ({settings.model}): {estimate}", flush=True)
    _phase(1, f"loading the base model ({settings.model}) on {model_device()}")
    with clock.phase("load"):
        base, tokenizer = _load_base(settings.model)
    _phase(2, f"building sentiment preference data: {settings.train_prompts} prompts x {settings.k} samples")
    with clock.phase("data"):
        data_path, counts = _make_pairs(settings, output_dir, base, tokenizer)
    # Each phase holds only its own models: training loads its policy, and the evaluation loads the
    # base again (a second or two) rather than keeping a copy resident through training.
    del base
    gc.collect()
    eval_cfg = eval_section(settings)
    runs: dict[str, Path] = {}
    for number, (label, loss) in enumerate((("dpo", "dpo"), ("aot", "aot_paired")), start=3):
        _phase(number, f"training {label.upper()} ({loss}, beta={settings.beta}, {settings.steps} steps)")
        with clock.phase(f"train_{label}"):
            runs[label] = _train(run_config(settings, loss, data_path, output_dir / label, eval_cfg))
            gc.collect()  # the run's model, before the next run loads its own
    # The training steps' freed activations stay with the allocator: the second run reused them, but
    # the evaluation's models (separate mappings) would come on top of them.
    release_freed_memory()
    _phase(5, "evaluating the reference, DPO and AOT on held-out prompts")
    with clock.phase("eval"):
        base, tokenizer = _load_base(settings.model)
        results = _evaluate(runs, base, tokenizer, eval_cfg)
        del base
    _phase(6, "writing the HTML report")
    with clock.phase("report"):
        report = write_report([runs["dpo"], runs["aot"]], output_dir / "report.html")

    summary = DemoSummary(
        table=summary_table(results),
        timings=clock.summary(),
        report=str(report),
        runs={k: str(v) for k, v in runs.items()},
        data={"path": str(data_path), "counts": counts},
        settings=dataclasses.asdict(settings),
    )
    (output_dir / "demo_summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return summary


def _make_pairs(settings: DemoSettings, output_dir: Path, base, tokenizer) -> tuple[Path, dict[str, int]]:
    from distalign.tasks.io import provenance_path
    from distalign.tasks.sampler import make_task_dataset

    data_path = make_task_dataset(
        "sentiment",
        output_dir / "data" / "sentiment_pairs.jsonl",
        model_name=settings.model,
        k=settings.k,
        num_prompts=settings.train_prompts,
        seed=settings.seed,
        max_new_tokens=settings.data_max_new_tokens,
        batch_size=settings.sample_batch_size,
        model=base,
        tokenizer=tokenizer,
    )
    counts = json.loads(provenance_path(data_path).read_text())["counts"]
    print(f"data: {data_path} ({_counts_line(counts)})")
    return data_path, counts


def _load_base(name: str):
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.tasks.sampler import model_device

    model, tokenizer = load_model_and_tokenizer(name)
    return model.to(model_device()).eval(), tokenizer


def _counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items())


def _train(config) -> Path:
    from distalign.train.offline import train_offline

    return train_offline(config)


def _evaluate(runs: dict[str, Path], base, tokenizer, eval_cfg: dict[str, Any]) -> dict[str, Any]:
    """Reference samples are drawn once and shared: both runs are compared with the same reference draws."""
    from distalign.config import load_config
    from distalign.config.evaluation import EvalConfig
    from distalign.eval.outcome import write_eval
    from distalign.eval.run import draw_reference_samples, eval_prompts, evaluate_models, load_trained_model

    cfg = EvalConfig(**eval_cfg)
    plan = eval_prompts(cfg, tokenizer)
    reference = draw_reference_samples(base, tokenizer, plan, cfg)
    results = {}
    for label, run_dir in runs.items():
        config = load_config(run_dir / "config.yaml")
        policy, _ = load_trained_model(run_dir / "final", config)
        outcome = evaluate_models(
            policy,
            base,
            tokenizer,
            cfg,
            reference_samples=reference,
            plan=plan,
            settings={
                "policy": str(run_dir / "final"),
                "reference": config.model.name,
            },
        )
        write_eval(outcome, run_dir / "eval")
        results[label] = outcome.result
        del policy, outcome
        gc.collect()  # one policy at a time beside the reference
    return results


def _estimate(value: Estimate | None) -> dict[str, float] | None:
    return None if value is None else dataclasses.asdict(value)


def summary_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{model, gold_reward, win_rate, kl}`` (estimates as dicts) for the reference and each run."""
    first = next(iter(results.values()))
    rows = [
        {
            "model": "reference",
            "gold_reward": _estimate(first.gold_reward["reference"]),
            "win_rate": None,
            "kl": 0.0,
        }
    ]
    for label, result in results.items():
        rows.append(
            {
                "model": label,
                "gold_reward": _estimate(result.gold_reward["policy"]),
                "win_rate": _estimate(result.win_rate),
                "kl": None if result.kl is None else result.kl.k1.value,
            }
        )
    return rows


def format_table(summary: DemoSummary) -> str:
    """The demo's table as aligned text: gold reward and win rate with their 95% intervals, and KL."""

    def cell(value: dict[str, float] | None) -> str:
        if value is None:
            return "-"
        return f"{value['value']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"

    header = f"{'model':<10} {'gold reward (VADER) [95% CI]':<32} {'win rate vs ref [95% CI]':<30} {'KL [nats]':>9}"
    lines = [header, "-" * len(header)]
    for row in summary.table:
        win = "-" if row["win_rate"] is None else cell(row["win_rate"]).replace("+", "")
        kl = "-" if row["kl"] is None else f"{row['kl']:.2f}"
        lines.append(f"{row['model']:<10} {cell(row['gold_reward']):<32} {win:<30} {kl:>9}")
    return "\n".join(lines)
