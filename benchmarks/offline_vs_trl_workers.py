"""The two worker processes of offline_vs_trl.py: one distalign run or one TRL DPOTrainer run.

Each is started as a fresh process by ``offline_vs_trl.py --worker ...``, trains, and writes per-step
wall and CPU times, setup time and its own peak RSS (VmHWM) as JSON. Both workers stamp the end of every
optimizer step the same way: TRL from a ``TrainerCallback.on_step_end``, distalign from a wrapper around
``Engine.log``, which its loop calls once per step (measurement only; nothing else is patched unless
``--fixes`` asks for it). TRL is imported only here, in the TRL worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_utils import current_rss_mb, distalign_step_times, peak_rss_mb, steady_state, write_result

# LoRA runs (--lora-r): adapters on these projections, alpha = 2r, no dropout, in both frameworks.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class StepClock:
    """(wall, process CPU) seconds at the start and at the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a step ends when its kernels have, not when they are queued
        self.stamps.append((time.perf_counter(), time.process_time()))


def _peak_gpu_mb() -> float | None:
    """Peak memory held by tensors on the GPU in this process (None on CPU)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _distalign_worker(args: argparse.Namespace) -> dict:
    from distalign.config import load_config
    from distalign.train import engine as engine_module
    from distalign.train.offline import train_offline

    scratch = Path(args.scratch)
    overrides = [
        f"output_dir={scratch / 'run'}",
        f"model.name={args.model_path}",
        "model.dtype=float32",
        f"data.path={args.data}",
        f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt}",
        "loss.name=dpo",
        "loss.beta=0.1",
        f"reference.precompute={'true' if args.setting == 'precomputed' else 'false'}",
        f"reference.cache_dir={scratch / 'reference_cache'}",  # fresh: the precompute is part of setup
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        "train.scheduler=constant",
        "train.warmup_ratio=0.0",
        # quoted: YAML reads a bare no as false. bf16 = autocast over float32 weights, as TRL's bf16=True
        f"train.mixed_precision='{'bf16' if args.precision == 'bf16' else 'no'}'",
        f"data.packing={'true' if args.packing else 'false'}",
        "train.log_every=1",  # the default; one record per step gives per-step wall times
        f"train.compile={'true' if getattr(args, 'compile', False) else 'false'}",
    ]
    if args.lora_r:  # the same adapters as the TRL worker's peft_config
        overrides += [
            "model.lora.enabled=true",
            f"model.lora.r={args.lora_r}",
            f"model.lora.alpha={2 * args.lora_r}",
        ]
        overrides += [f"model.lora.target_modules=[{','.join(LORA_TARGETS)}]"]
    imported_rss = current_rss_mb()
    clock = StepClock()
    log_step = engine_module.Engine.log

    def log_and_stamp(engine, step, metrics):
        log_step(engine, step, metrics)
        clock.tick()

    engine_module.Engine.log = log_and_stamp
    if args.block_diagonal_mask:  # packed attention as before span attention: one masked call per row
        from distalign.train import setup as setup_module

        setup_module.packs_on_span_attention = lambda config: False
    config = load_config(None, overrides)
    clock.tick()
    # stop_after_step = max_steps ends right after the last optimizer step, skipping the final save
    # (TRL saves nothing in this benchmark either).
    run_dir = train_offline(config, stop_after_step=args.steps)
    peak = peak_rss_mb()
    _, step_tokens = distalign_step_times(run_dir)
    return {
        "stamps": clock.stamps,
        "peak_rss_mb": peak,
        "peak_gpu_mb": _peak_gpu_mb(),
        "rss_after_imports_mb": imported_rss,
        "tokens_per_pair": statistics.mean(step_tokens) / args.batch,
    }


def _trl_worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepClock()

    class StampSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002 - TrainerCallback signature
            clock.tick()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
    imported_rss = current_rss_mb()
    equal_footing = {
        # fused torch.optim.AdamW, as distalign's engine builds it (train/optim.py::build_adamw)
        "optim": "adamw_torch_fused",
        "gradient_checkpointing": False,  # TRL's default is True; distalign's is False
        "precompute_ref_log_probs": args.setting == "precomputed",
    }
    config = DPOConfig(
        output_dir=str(Path(args.scratch) / "trl"),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.batch // args.micro,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        bf16=args.precision == "bf16",  # autocast over float32 weights (model_init_kwargs below)
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=0,
        **({} if args.setting == "trl_defaults" else equal_footing),
    )
    clock.tick()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if tokenizer.pad_token is None:  # what distalign's loader does too
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
    trainer = DPOTrainer(
        model=args.model_path,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StampSteps()],
        peft_config=peft_config,
    )
    trainer.train()
    peak = peak_rss_mb()
    peak_gpu = _peak_gpu_mb()
    data = trainer.train_dataset
    tokens = [
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    ]
    return {
        "stamps": clock.stamps,
        "peak_rss_mb": peak,
        "peak_gpu_mb": peak_gpu,
        "rss_after_imports_mb": imported_rss,
        "tokens_per_pair": statistics.mean(tokens),
    }


FIXES = {
    "malloc_mmap_threshold": "mallopt(M_MMAP_THRESHOLD, 1 MiB) at start-up: freed tensors go back to the OS",
}


def _apply_fixes(names: list[str]) -> None:
    """Prototype proposed library changes inside this worker only (the library does not do this)."""
    if "malloc_mmap_threshold" in names:
        import ctypes

        m_mmap_threshold = -3  # from glibc's malloc.h
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1024 * 1024)


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    _apply_fixes([name for name in args.fixes.split(",") if name])
    run = _distalign_worker if args.worker == "distalign" else _trl_worker
    if args.profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(run, args)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        result["profile"] = text.getvalue()
    else:
        result = run(args)
    stamps = result.pop("stamps")
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    result.update(steady_state(wall, args.warmup))
    result.update({f"cpu_{key}": value for key, value in steady_state(cpu, args.warmup).items()})
    result["step_times"], result["cpu_step_times"] = wall, cpu
    # The first interval runs from the entry call to the end of step 1: setup plus one step.
    result["setup_s"] = wall[0] - result["median_step_s"]
    write_result(args.result, result)
