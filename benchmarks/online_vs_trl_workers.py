"""The two worker processes of online_vs_trl.py: one distalign online RLOO run or one TRL RLOOTrainer run.

Each is started as a fresh process by ``online_vs_trl.py --worker ...``, trains, and writes per-step
wall times, per-phase seconds, completion lengths and its own peak RSS (VmHWM) as JSON. Step ends are
stamped as in offline_vs_trl_workers (distalign: a wrapper around ``Engine.log``, called once per step;
TRL: ``TrainerCallback.on_step_end``). TRL's phases are timed by wrapping its generation, its log-prob
passes and its reward call on the trainer instance (measurement only). TRL is imported only here, in
the TRL worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from bench_utils import call_after, current_rss_mb, peak_rss_mb, steady_state, write_result
from offline_vs_trl_workers import StepClock

TASK_REWARD = {"sentiment": "vader_sentiment"}


def _reward_spec(task: str) -> str:
    return TASK_REWARD.get(task, "vader_sentiment")


def _distalign_worker(args: argparse.Namespace) -> dict:
    from distalign.config import load_config
    from distalign.train import engine as engine_module
    from distalign.train.online import train_online

    scratch = Path(args.scratch)
    batch = args.prompts * args.samples
    overrides = [
        f"output_dir={scratch / 'run'}",
        f"model.name={args.model_path}",
        "model.dtype=float32",
        f"model.lora.enabled={'true' if args.lora else 'false'}",
        "model.lora.r=16",
        "model.lora.alpha=32",
        "model.lora.target_modules=all-linear",
        "train.seed=0",
        f"train.batch_size={batch}",  # = prompts x samples per step, as the online loop requires
        f"train.micro_batch_size={args.micro}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        "train.scheduler=constant",
        "train.warmup_ratio=0.0",
        "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        "train.log_every=1",
        "train.progress=false",
        "online.method=rloo",
        f"online.reward={_reward_spec(args.task)}",
        f"online.kl_coef={args.kl_coef}",
        f"online.prompts.task={args.task}",
        f"online.prompts_per_step={args.prompts}",
        f"online.samples_per_prompt={args.samples}",
        f"online.max_new_tokens={args.new_tokens}",
        f"online.sampling_batch_size={batch}",  # one generation batch, as TRL's generation_batch_size
        "online.eval_every=0",
        *args.distalign_set,
    ]
    imported_rss = current_rss_mb()
    clock = StepClock()
    call_after(engine_module.Engine, "log", clock.tick)  # the loop logs once per step (log_every=1)
    config = load_config(None, overrides)
    clock.tick()
    run_dir = train_online(config, stop_after_step=args.steps)  # no final save (TRL saves nothing either)
    peak = peak_rss_mb()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    measured = records[args.warmup :]
    phases = {
        key[len("time/") :]: statistics.median(r[key] for r in measured)
        for key in measured[0]
        if key.startswith("time/")
    }
    return {
        "stamps": clock.stamps,
        "peak_rss_mb": peak,
        "rss_after_imports_mb": imported_rss,
        "completion_tokens": statistics.mean(r["completion_tokens"] for r in measured),
        "phases": phases,
    }


class PhaseClock:
    """Seconds per phase and optimizer step, from wrapped trainer methods; "update" is the rest of the
    step (the forward with gradients, backward, optimizer step, TRL's bookkeeping)."""

    MEASURED = ("sample", "score_reference", "reward")

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, name: str, phase_of) -> None:
        """Time calls of ``owner.name`` as phase ``phase_of()`` (None: not timed)."""
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            phase, started = phase_of(), time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if phase is not None:
                    self.current[phase] += time.perf_counter() - started

        setattr(owner, name, timed)

    def end_step(self, seconds: float) -> None:
        phases = {key: self.current.get(key, 0.0) for key in self.MEASURED}
        phases.update(step=seconds, update=seconds - sum(phases.values()))
        self.steps.append(phases)
        self.current.clear()


def _trl_worker(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from distalign.rewards import build_reward
    from distalign.tasks import get_task

    clock, phases = StepClock(), PhaseClock()

    class StampSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002 - TrainerCallback signature
            clock.tick()
            phases.end_step(clock.stamps[-1][0] - clock.stamps[-2][0])

    task = get_task(args.task)
    rows = [{"prompt": task.messages(text), "context": text} for text in task.prompts("train")]
    reward = build_reward(_reward_spec(args.task))

    def reward_fn(prompts, completions, context, **kwargs):  # noqa: ARG001 - TRL passes dataset columns
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(v) for v in reward(list(context), texts)]

    reward_fn.__name__ = "reward"
    imported_rss = current_rss_mb()
    batch = args.prompts * args.samples
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    config = RLOOConfig(
        output_dir=str(Path(args.scratch) / "trl"),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=batch // args.micro,
        num_generations=args.samples,
        max_completion_length=args.new_tokens,
        temperature=1.0,  # exact sampling, as distalign: no temperature, top-k or top-p
        top_k=0,
        top_p=1.0,
        beta=args.kl_coef,
        num_iterations=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is True; distalign's is False
        bf16=False,  # TRL defaults to bf16; both run fp32
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,  # per-step metrics, as distalign's log_every=1
        disable_tqdm=True,
        seed=0,
    )
    clock.tick()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if tokenizer.pad_token is None:  # what distalign's loader does too
        tokenizer.pad_token = tokenizer.eos_token
    trainer = RLOOTrainer(
        model=args.model_path,
        reward_funcs=[reward_fn],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StampSteps()],
        peft_config=peft_config,
    )
    sampling = trainer.generation_config  # what its generate() samples with: exact, as distalign
    exact = sampling.do_sample and sampling.temperature == 1.0 and sampling.top_k in (0, None)
    if not (exact and sampling.top_p in (1.0, None) and sampling.repetition_penalty in (1.0, None)):
        raise RuntimeError(f"TRL would not sample from the model's own distribution: {sampling}")
    phases.wrap(trainer, "_generate", lambda: "sample")
    phases.wrap(trainer, "_calculate_rewards", lambda: "reward")
    phases.wrap(
        trainer,
        "_get_per_token_logps_and_entropies",
        lambda: None if torch.is_grad_enabled() else "score_reference",
    )
    trainer.train()
    peak = peak_rss_mb()
    lengths = [
        e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e
    ]
    measured = phases.steps[args.warmup :]
    return {
        "stamps": clock.stamps,
        "peak_rss_mb": peak,
        "rss_after_imports_mb": imported_rss,
        "completion_tokens": statistics.mean(lengths[args.warmup :] or lengths),
        "phases": {key: statistics.median(s.get(key, 0.0) for s in measured) for key in measured[0]},
    }


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    args.lora = bool(args.lora)
    run = _distalign_worker if args.worker == "distalign" else _trl_worker
    result = run(args)
    stamps = result.pop("stamps")
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]  # this process's CPU time: less load-sensitive
    result.update(steady_state(wall, args.warmup))
    result["samples_per_s"] = args.prompts * args.samples / result["s_per_step"]
    result["samples_per_cpu_s"] = args.prompts * args.samples / steady_state(cpu, args.warmup)["s_per_step"]
    result["step_times"] = wall
    result["setup_s"] = wall[0] - result["median_step_s"]  # entry call to end of step 1, minus a step
    write_result(args.result, result)
