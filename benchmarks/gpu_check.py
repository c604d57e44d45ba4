"""One prepared check for a lent GPU machine (one H100, ~78 GiB, no internet): the offline DPO step
against TRL, packed = padded on CUDA, and the launch configs, in 8 minutes or less.

    python3 benchmarks/gpu_check.py --out $OUT                  # on the GPU machine (wheels carried)
    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gc  # here: the same code paths, < 90 s

It writes gpu_check.json (every number, every error's text) and gpu_check.md (the tables) into --out
(default: $OUT), both rewritten after every part, so a run cut short still leaves what finished.

Packages the machine lacks travel as wheels (scripts/gpu_wheels.sh downloads them into
benchmarks/wheels): each wheel whose distribution this Python does not have is pip-installed with
--no-deps --no-index into a temporary folder on sys.path and on the workers' PYTHONPATH; what the
machine has (torch, transformers, peft, accelerate) is never replaced. Requirements of the installed
wheels that the machine's packages do not meet are listed in the JSON. The library itself runs from
src/ (PYTHONPATH), as the working tree arrives uninstalled.

Parts, in this order, each with its own cap in seconds; every GPU run is a subprocess killed with its
children at the cap (or at the end of the whole budget, if sooner), its error recorded, and the next
part starts (estimates for an H100 in brackets):

  setup                     wheels, versions, the measured bf16 matmul rate (8192^3)        [~15 s]
  exactness            45   packed vs padded per-sequence log-probs and parameter gradients, float32
                            and bf16 autocast, on the 0.5B shape (8 pairs sharing their prompt, as
                            DPO packs them; up to 384 prompt + 768 completion tokens), with a planted
                            dropped completion token that must fail; includes building the 0.5B
                            model                                                             [~25 s]
  dpo qwen2-0.5b 2048  80   gpu_step.py's arms (TRL 1.16's DPOTrainer first, so a part cut short
  dpo qwen2-0.5b 4096  90   still has the baseline; then distalign padded and packed) through
                            offline_vs_trl.py's workers, each a fresh process, on equal footing
                            (fused AdamW both sides, the same rows, reference precomputed and not
                            timed, bf16 autocast over float32 weights, no gradient checkpointing):
                            batch 8 pairs, micro-batch 2, 5 steps of which the first 2 are not timed
                            (3 timed: on a GPU the step time settles after the first), one run per
                            arm                                                        [~20-25 s a worker]
  sharded_smoke        90   benchmarks/sharded_smoke.py on one GPU, 4 steps: the ddp, fsdp2 and
                            fsdp2_offload launch configs (zero2 and zero3 need DeepSpeed, which the
                            image lacks and no wheel brings)                                  [~60 s]
  dpo qwen2-1.5b 4096 150   as above on the 1.5B shape with micro-batch 1 (2 pairs of up to 4096
                            tokens would need ~80 GB); includes building the 1.5B model    [~130 s]
  ---------------------------
  budget              470   for everything above, setup included; 10 s of the 8 minutes are margin

Each DPO row reports s/step, tokens/s (prompt counted in both sequences of a pair), the TFLOP/s of
the FLOPs a DPO step needs (gpu_step.dpo_step_flops: the same count for every arm), MFU = that over
the measured bf16 matmul rate, peak GPU memory (torch.cuda.max_memory_allocated in the worker), and
speed and memory over TRL's.

Exactness tolerances (packed against padded, same precision):
  float32  per-sequence log-prob sums within 1e-5 relative and every parameter's gradient within 1e-4
           of its own norm: the two layouts run different attention kernels (packed: FlexAttention over a
           block mask on a GPU, span attention on the CPU; padded: SDPA), which
           differ only in float32 rounding order; a packing error (a dropped or leaked token) moves a
           sequence's log-prob by a whole token's (nats: ~1e-3 relative at these lengths).
  bf16     at most 2x the rounding bf16 itself commits on the padded batch (its distance to the
           float32 padded result: the largest log-prob gap, the largest per-parameter gradient gap):
           two bf16 computations through different kernels differ by up to the sum of their two
           rounding errors, each about that size, and bf16 (8 significand bits) gives no tighter
           absolute bound that holds for every model and length.

Left out, for the 8 minutes: the online RLOO step against TRL's RLOOTrainer (benchmarks/
online_vs_trl.py): its two workers on the 0.5B shape would need ~80 s more than the parts above
leave; run it in a session of its own. Host reads per step: the workers do not count them, and a
counting worker of its own (torch.cuda.set_sync_debug_mode) does not fit either; the tests count them
on the CPU (tests/train/test_host_reads.py).

The dry run (--cpu-dry-run) runs the same parts on the CPU with the tiny shape: one DPO row (64
tokens, batch 4, 2 steps of which 1 not timed), 3 pairs of up to 12 + 16 tokens for the exactness
check (bf16 autocast is supported on the CPU, so both precisions run), sharded_smoke.py with the ddp
config on 1 process for 2 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(REPO / "src"))  # the working tree arrives uninstalled on the GPU machine
from bench_utils import WORKER_ENV, markdown_table, run_in_own_group, run_worker, write_result  # noqa: E402
from gpu_step import (  # noqa: E402
    ARMS,
    SHAPES,
    _worker_args,
    build_model,
    dpo_step_flops,
    matmul_tflops,
    mixed_length_pairs,
)

JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
MIN_START_S = 10.0  # a worker needs this long just to import torch; fewer seconds left: not started
VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
FP32_LOGPROB_RTOL, FP32_GRAD_RTOL, BF16_FACTOR = 1e-5, 1e-4, 2.0
ARM_ORDER = ("trl", "distalign", "distalign packed")  # the baseline first: a part cut short keeps it
assert set(ARM_ORDER) == set(ARMS)
LEFT_OUT = {
    "online_rloo": "online RLOO vs TRL's RLOOTrainer does not fit the 8 minutes next to the other parts "
    "(two more workers on the 0.5B shape, ~80 s); run benchmarks/online_vs_trl.py in a session of its own",
    "host_reads_per_step": "not counted on the GPU: the workers do not count them, and a counting pass "
    "(torch.cuda.set_sync_debug_mode in a worker of its own) does not fit; tests/train/test_host_reads.py "
    "counts them on the CPU",
}


# -------------------------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class DpoRun:
    shape: str
    length: int
    micro: int
    cap_s: float

    @property
    def name(self) -> str:
        return f"dpo {self.shape} {self.length}"


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    budget_s: float
    batch: int
    steps: int
    warmup: int
    exactness_shape: str
    exactness_pairs: int
    exactness_max_prompt: int
    exactness_max_completion: int
    exactness_cap_s: float
    smoke_args: tuple[str, ...]
    smoke_cap_s: float
    early_dpo: tuple[DpoRun, ...]  # before the sharded smoke
    late_dpo: tuple[DpoRun, ...]  # after it: the most expensive, which takes what the budget has left


GPU_PLAN = Plan(
    device="cuda", budget_s=470, batch=8, steps=5, warmup=2,
    exactness_shape="qwen2-0.5b", exactness_pairs=8, exactness_max_prompt=384,
    exactness_max_completion=768, exactness_cap_s=45,
    smoke_args=("--configs", "ddp,fsdp2,fsdp2_offload", "--steps", "4"), smoke_cap_s=90,
    early_dpo=(DpoRun("qwen2-0.5b", 2048, 2, 80), DpoRun("qwen2-0.5b", 4096, 2, 90)),
    late_dpo=(DpoRun("qwen2-1.5b", 4096, 1, 150),),
)  # fmt: skip
# Caps are generous here: they only stop a hang; the dry run's own time is what the test watches.
DRY_PLAN = Plan(
    device="cpu", budget_s=300, batch=4, steps=2, warmup=1,
    exactness_shape="tiny", exactness_pairs=3, exactness_max_prompt=12,
    exactness_max_completion=16, exactness_cap_s=60,
    smoke_args=("--configs", "ddp", "--processes", "1", "--steps", "2", "--batch", "4"), smoke_cap_s=90,
    early_dpo=(DpoRun("tiny", 64, 2, 120),), late_dpo=(),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- wheels
def install_missing_wheels(wheels: Path, target: Path) -> dict[str, Any]:
    """pip-install (no index, no dependencies) into ``target`` each wheel in ``wheels`` that fits this
    Python and whose distribution it lacks, and put ``target`` on sys.path; distributions already
    installed are kept as they are. Returns what was installed, kept and skipped, and the unmet
    requirements of what was installed."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    report: dict[str, Any] = {"dir": str(wheels), "dir_found": wheels.is_dir(), "installed": [], "kept": [],
                              "not_for_this_python": []}  # fmt: skip
    missing: dict[str, Path] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & supported:
            report["not_for_this_python"].append(wheel.name)
            continue
        try:
            report["kept"].append(f"{name} {importlib.metadata.version(name)} (carried {version})")
        except importlib.metadata.PackageNotFoundError:
            missing[name] = wheel
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                   "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
                   *map(str, missing.values())]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if completed.returncode != 0:
            raise RuntimeError(f"pip install failed: {(completed.stdout + completed.stderr)[-2000:]}")
        sys.path.append(str(target))  # last: it only holds what nothing else provides
        importlib.invalidate_caches()
        report["installed"] = [wheel.name for wheel in missing.values()]
    report["unmet_requirements"] = unmet_requirements(list(missing))
    return report


def unmet_requirements(distributions: list[str]) -> list[str]:
    """Each unconditional requirement of ``distributions`` that the installed packages do not meet."""
    from packaging.requirements import Requirement

    unmet = []
    for distribution in distributions:
        for line in importlib.metadata.requires(distribution) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{distribution} needs {requirement} (missing)")
                continue
            if not requirement.specifier.contains(have, prereleases=True):
                unmet.append(f"{distribution} needs {requirement} (have {have})")
    return unmet


# -------------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """HEAD of the repository, else $DISTALIGN_COMMIT (the GPU machine gets the tree without .git)."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if completed.returncode == 0:
            return completed.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DISTALIGN_COMMIT", "unknown")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def free_device_memory() -> None:
    """Give the parent's cached GPU blocks back, so the workers can have them."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ context
@dataclasses.dataclass
class Context:
    plan: Plan
    scratch: Path
    worker_env: dict[str, str]
    budget_end: float
    matmul_tflops: float = float("nan")
    models: dict[str, Path] = dataclasses.field(default_factory=dict)

    def seconds_left(self, deadline: float) -> float:
        """Seconds a subprocess may run before ``deadline``; raises when too few are left to start one."""
        left = min(deadline, self.budget_end) - time.monotonic()
        if left < MIN_START_S:
            raise TimeoutError(f"not started: {left:.0f} s left (of the part's cap or of the whole budget)")
        return left

    def model(self, shape: str) -> Path:
        """The saved random model of ``shape`` (gpu_step.build_model), built on first use."""
        if shape not in self.models:
            import torch

            path = self.scratch / f"model_{shape}"
            max_length = max([run.length for run in self.plan.early_dpo + self.plan.late_dpo], default=0)
            # Initialised on the device: the 1.5B shape takes seconds there, half a minute on the CPU.
            with torch.device(self.plan.device):
                build_model(SHAPES[shape], max_length, path)
            free_device_memory()
            self.models[shape] = path
        return self.models[shape]


# ------------------------------------------------------------------------------------- part: DPO
def dpo_arm_row(result: dict, tokens_per_step: float, flops_per_step: float, peak_tflops: float) -> dict:
    achieved = flops_per_step / result["s_per_step"] / 1e12
    return {
        "s_per_step": result["s_per_step"],
        "tokens_per_s": tokens_per_step / result["s_per_step"],
        "tflops": achieved,
        "mfu_measured_peak": achieved / peak_tflops,
        "peak_gpu_mb": result.get("peak_gpu_mb"),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "setup_s": result.get("setup_s"),
        "step_times": result.get("step_times"),
    }


def add_ratios_to_trl(arms: dict[str, dict]) -> None:
    """Speed (TRL's s/step over the arm's) and peak GPU memory (the arm's over TRL's) of every arm."""
    trl = arms.get("trl", {})
    for row in arms.values():
        if "s_per_step" in row and "s_per_step" in trl:
            row["speed_vs_trl"] = trl["s_per_step"] / row["s_per_step"]
        if row.get("peak_gpu_mb") and trl.get("peak_gpu_mb"):
            row["memory_vs_trl"] = row["peak_gpu_mb"] / trl["peak_gpu_mb"]


def dpo_part(context: Context, run: DpoRun, deadline: float) -> dict:
    plan = context.plan
    model = context.model(run.shape)
    data = context.scratch / f"pairs_{run.shape}_{run.length}.jsonl"
    counts = mixed_length_pairs(model, data, plan.steps * plan.batch, run.length)
    tokens_per_step = sum(2 * prompt + chosen + rejected for prompt, chosen, rejected in counts) / plan.steps
    flops_per_step = dpo_step_flops(SHAPES[run.shape], counts, plan.steps)
    settings = argparse.Namespace(batch=plan.batch, micro=run.micro, steps=plan.steps, warmup=plan.warmup)
    arms: dict[str, dict] = {}
    for arm in ARM_ORDER:
        try:
            result = run_worker(
                str(BENCHMARKS / "offline_vs_trl.py"),
                _worker_args(settings, arm, model, data, run.length),
                timeout=context.seconds_left(deadline),
                env=context.worker_env,
            )
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as err:  # the other arms go on
            arms[arm] = {"error": describe(err)}
        else:
            arms[arm] = dpo_arm_row(result, tokens_per_step, flops_per_step, context.matmul_tflops)
        print(f"  {run.name} {arm}: {short(arms[arm])}", flush=True)
    add_ratios_to_trl(arms)
    return {
        "shape": run.shape, "max_tokens": run.length, "batch": plan.batch, "micro_batch": run.micro,
        "steps": plan.steps, "warmup": plan.warmup, "tokens_per_step": tokens_per_step,
        "flops_per_step": flops_per_step, "arms": arms,
    }  # fmt: skip


# ------------------------------------------------------------------------------ part: exactness
def exactness_part(context: Context, deadline: float) -> dict:
    plan = context.plan
    worker_args = [
        "--worker", "exactness", "--model-path", str(context.model(plan.exactness_shape)),
        "--pairs", str(plan.exactness_pairs), "--max-prompt", str(plan.exactness_max_prompt),
        "--max-completion", str(plan.exactness_max_completion),
    ]  # fmt: skip
    result = run_worker(
        str(Path(__file__).resolve()),
        worker_args,
        timeout=context.seconds_left(deadline),
        env=context.worker_env,
    )
    result.pop("process_wall_s", None)
    return result


def paired_sequences(pairs: int, max_prompt: int, max_completion: int, vocab: int) -> tuple[list, list]:
    """2 x ``pairs`` random sequences, chosen and rejected of a pair sharing its prompt (as DPO's);
    token ids clear of the tiny tokenizer's special tokens (0-4)."""
    import torch

    generator = torch.Generator().manual_seed(0)

    def tokens(low: int, high: int) -> list[int]:
        count = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(5, vocab, (count,), generator=generator).tolist()

    prompts, completions = [], []
    for _ in range(pairs):
        prompt = tokens(max(1, max_prompt // 4), max_prompt)
        prompts += [prompt, prompt]
        completions += [tokens(2, max_completion), tokens(2, max_completion)]
    return prompts, completions


def logprobs_and_gradients(module, batch: dict, weights, autocast_dtype) -> tuple[Any, dict[str, Any]]:
    """Per-sequence log-prob sums and the gradient of sum_i w_i logp_i (distinct w_i, so a sequence
    mixed up with another shows), both in float32."""
    import torch

    from distalign.data.collate import to_device
    from distalign.models.logprobs import batch_logprobs

    device = weights.device
    module.zero_grad(set_to_none=True)
    batch = to_device(batch, device)
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        summed, _ = batch_logprobs(module, batch)
    (summed.float() * weights).sum().backward()
    gradients = {
        name: parameter.grad.detach().float().clone()
        for name, parameter in module.named_parameters()
        if parameter.grad is not None
    }
    return summed.detach().float(), gradients


def differences(logprobs, gradients: dict, reference_logprobs, reference_gradients: dict) -> dict:
    """The largest log-prob gap (absolute; relative to the reference's size) and the largest gradient
    gap (elementwise absolute; per parameter, ||a - b|| over ||b||, and which parameter)."""
    gap = (logprobs - reference_logprobs).abs()
    relative = {
        name: float((gradients[name] - reference).norm() / reference.norm().clamp_min(1e-30))
        for name, reference in reference_gradients.items()
    }
    worst = max(relative, key=relative.get)
    return {
        "logprob_max_abs": float(gap.max()),
        "logprob_max_rel": float((gap / reference_logprobs.abs().clamp_min(1e-30)).max()),
        "grad_max_abs": max(float((gradients[k] - v).abs().max()) for k, v in reference_gradients.items()),
        "grad_max_rel": relative[worst],
        "grad_worst_parameter": worst,
    }


def dropped_completion_token(batch: dict) -> dict:
    """The control: the packed batch with the last completion token of sequence 0 left out, as a
    packer off by one would; the float32 comparison must catch it."""
    from distalign.data.collate import predictor_positions

    broken = type(batch)({key: value.clone() for key, value in batch.items()})
    mask = broken["completion_mask"].view(-1)
    positions = ((broken["sequence_index"].view(-1) == 0) & (mask == 1)).nonzero()
    mask[positions[-1]] = 0
    # the packer's host-side indices follow the mask, as a buggy packer's would
    indices = predictor_positions(
        broken["completion_mask"], broken["sequence_index"], broken.get("group_index")
    )
    broken["target_positions"], broken["predictor_positions"] = indices
    return broken


def exactness_worker(args: argparse.Namespace) -> dict:
    """Packed vs padded on this device (module docstring: tolerances). Runs as a subprocess."""
    import torch

    from distalign.data.collate import collate_sequences, pack_sequences
    from distalign.models.attention import without_cudnn_attention
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.models.logprobs import SequenceLogprobModel
    from distalign.models.packed_logprobs import packed_attention_kind, packing_layout_of

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Loaded on span attention, as the training setup loads a model when data.packing is on.
    model, _ = load_model_and_tokenizer(args.model_path, dtype="float32", span_attention=True)
    model = model.to(device)
    layout = packing_layout_of(model, share_prompts=True)
    module = SequenceLogprobModel(model, packing=layout)
    prompts, completions = paired_sequences(
        args.pairs, args.max_prompt, args.max_completion, model.config.vocab_size
    )
    pad = model.config.pad_token_id or 0
    padded = collate_sequences(prompts, completions, pad)
    packed = pack_sequences(prompts, completions, pad, rows=layout.rows)
    weights = torch.linspace(-1.0, 2.0, len(prompts), device=device)
    run = without_cudnn_attention(logprobs_and_gradients)  # the kernels the training loops use
    float32_padded = run(module, padded, weights, None)
    float32_packed = run(module, packed, weights, None)
    bf16_padded = run(module, padded, weights, torch.bfloat16)
    bf16_packed = run(module, packed, weights, torch.bfloat16)
    control = run(module, dropped_completion_token(packed), weights, None)

    float32 = differences(*float32_packed, *float32_padded)
    float32["passed"] = float32_within(float32)
    bf16_rounding = differences(*bf16_padded, *float32_padded)
    bf16 = differences(*bf16_packed, *bf16_padded)
    bf16["logprob_tolerance_abs"] = BF16_FACTOR * bf16_rounding["logprob_max_abs"]
    bf16["grad_tolerance_rel"] = BF16_FACTOR * bf16_rounding["grad_max_rel"]
    bf16["passed"] = (
        bf16["logprob_max_abs"] <= bf16["logprob_tolerance_abs"]
        and bf16["grad_max_rel"] <= bf16["grad_tolerance_rel"]
    )
    caught = not float32_within(differences(*control, *float32_padded))
    return {
        "device": str(device),
        "packed_attention": packed_attention_kind(model),
        "sequences": len(prompts),
        "completion_tokens": sum(map(len, completions)),
        "packed_shape": list(packed["input_ids"].shape),
        "padded_shape": list(padded["input_ids"].shape),
        "float32": {
            **float32,
            "logprob_tolerance_rel": FP32_LOGPROB_RTOL,
            "grad_tolerance_rel": FP32_GRAD_RTOL,
        },
        "bf16": bf16,
        "bf16_rounding_of_padded": bf16_rounding,
        "control_dropped_token_caught": caught,
        "passed": float32["passed"] and bf16["passed"] and caught,
    }


def float32_within(gaps: dict) -> bool:
    return gaps["logprob_max_rel"] <= FP32_LOGPROB_RTOL and gaps["grad_max_rel"] <= FP32_GRAD_RTOL


# ---------------------------------------------------------------------------- part: sharded smoke
def sharded_smoke_part(context: Context, deadline: float) -> dict:
    """benchmarks/sharded_smoke.py as a subprocess; its table's rows, by column."""
    command = [sys.executable, str(BENCHMARKS / "sharded_smoke.py"), *context.plan.smoke_args]
    completed = run_in_own_group(
        command, timeout=context.seconds_left(deadline), env={**os.environ, **context.worker_env}
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"sharded_smoke.py exited {completed.returncode}:\n{output[-3000:]}")
    return {"args": list(context.plan.smoke_args), "rows": table_rows(completed.stdout, "| launch |")}


def table_rows(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table in ``text`` whose header line starts with ``header_start``."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    if not starts:
        raise RuntimeError(f"no table starting {header_start!r} in the output:\n{text[-2000:]}")
    start = starts[-1]
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


# ------------------------------------------------------------------------------------------ report
def describe(err: BaseException) -> str:
    """An error's text for the report: a timeout with the output it left, else the message's end."""
    if isinstance(err, subprocess.TimeoutExpired):
        output = "".join(part for part in (err.stdout, err.stderr) if isinstance(part, str))
        return f"timed out after {err.timeout:.0f} s; output's end:\n{output[-1500:]}"
    text = f"{type(err).__name__}: {err}"
    if len(text) <= 3000:
        return text
    return f"{text.splitlines()[0][:300]}\n...\n{text[-2700:]}"  # what failed, and how it ended


def gist(error: str) -> str:
    """An error's first and last lines: what failed, and (for a worker) the exception it ended with."""
    lines = [line.strip() for line in error.splitlines() if line.strip()] or [""]
    return lines[0][:200] if len(lines) == 1 else f"{lines[0][:200]} ... {lines[-1][:300]}"


def short(entry: dict) -> str:
    """One line for the console: an error's gist, a DPO arm's speed, or the exactness verdict."""
    if "error" in entry:
        return "ERROR " + gist(entry["error"])
    if "s_per_step" in entry:
        return f"{entry['s_per_step']:.3f} s/step, {entry['tokens_per_s']:.0f} tokens/s"
    if "passed" in entry.get("result", {}):
        return "passed" if entry["result"]["passed"] else "FAILED"
    return "done"


def run_part(report: dict, name: str, cap_s: float, work: Callable[[float], dict]) -> None:
    """Run one part with its deadline; its result or its error goes into ``report["parts"][name]``."""
    started = time.monotonic()
    entry: dict[str, Any] = {"cap_s": cap_s}
    print(f"[{time.monotonic() - report['_start']:.0f} s] {name} (cap {cap_s:.0f} s)", flush=True)
    try:
        entry["result"] = work(started + cap_s)
    except Exception as err:  # one part failing keeps the others
        entry["error"] = describe(err)
    entry["seconds"] = round(time.monotonic() - started, 1)
    print(f"  {name}: {short(entry)} ({entry['seconds']} s)", flush=True)
    report["parts"][name] = entry


def write_report(out: Path, report: dict) -> None:
    public = {key: value for key, value in report.items() if not key.startswith("_")}
    public["total_s"] = round(time.monotonic() - report["_start"], 1)
    (out / JSON_NAME).write_text(json.dumps(public, indent=1, default=str))
    (out / MARKDOWN_NAME).write_text(markdown_report(public))


def number(value: Any) -> Any:
    return "" if value is None else value


def dpo_table(parts: dict) -> str:
    header = ["shape", "max tokens", "micro-batch", "arm", "s/step", "tokens/s", "TFLOP/s", "MFU (measured peak)",
              "peak GPU MB", "speed vs TRL", "memory vs TRL"]  # fmt: skip
    rows = []
    for entry in parts.values():
        result = entry.get("result", {})
        for arm, row in result.get("arms", {}).items():
            if "error" in row:
                rows.append([result["shape"], result["max_tokens"], result["micro_batch"], arm, "failed"])
                continue
            keys = ("s_per_step", "tokens_per_s", "tflops", "mfu_measured_peak", "peak_gpu_mb")
            ratios = (number(row.get("speed_vs_trl")), number(row.get("memory_vs_trl")))
            rows.append([result["shape"], result["max_tokens"], result["micro_batch"], arm,
                         *(number(row[k]) for k in keys), *ratios])  # fmt: skip
    return markdown_table(header, rows)


def exactness_table(result: dict) -> str:
    header = ["precision", "log-prob max abs", "log-prob max rel", "grad max abs", "grad max rel (per parameter)",
              "worst parameter", "tolerance", "pass"]  # fmt: skip
    float32, bf16 = result["float32"], result["bf16"]
    tolerances = {
        "float32": f"log-prob rel {FP32_LOGPROB_RTOL:g}, grad rel {FP32_GRAD_RTOL:g}",
        "bf16": f"log-prob abs {bf16['logprob_tolerance_abs']:.3g}, grad rel {bf16['grad_tolerance_rel']:.3g} "
        f"({BF16_FACTOR:g}x bf16's own rounding of the padded batch)",
    }
    rows = [
        [name, gaps["logprob_max_abs"], gaps["logprob_max_rel"], gaps["grad_max_abs"], gaps["grad_max_rel"],
         gaps["grad_worst_parameter"], tolerances[name], "yes" if gaps["passed"] else "NO"]
        for name, gaps in (("float32", float32), ("bf16", bf16))
    ]  # fmt: skip
    return markdown_table(header, rows)


def wheels_line(wheels: dict) -> str:
    if not wheels.get("dir_found", True):
        return f"No wheels folder ({wheels['dir']}): nothing was installed (scripts/gpu_wheels.sh downloads them)"
    unmet = "; ".join(wheels.get("unmet_requirements", [])) or "none"
    return f"Wheels installed: {', '.join(wheels.get('installed', [])) or 'none'}; their unmet requirements: {unmet}"


def markdown_report(report: dict) -> str:
    parts = report["parts"]
    lines = [
        f"# GPU check ({report['mode']}), {report['date']}",
        "",
        f"Device {report['device']}; commit {report['commit']}; measured matmul "
        f"{report.get('matmul_tflops', float('nan')):.3g} TFLOP/s; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        wheels_line(report["wheels"]),
        "",
        "## One offline DPO step, distalign vs TRL (equal footing)",
        "",
        dpo_table({name: entry for name, entry in parts.items() if name.startswith("dpo ")}),
    ]
    exactness = parts.get("exactness", {}).get("result")
    if exactness:
        lines += ["", "## Packed vs padded on " + exactness["device"], "", exactness_table(exactness), "",
                  f"Control (a dropped completion token) caught: {exactness['control_dropped_token_caught']}; "
                  f"packed attention: {exactness['packed_attention']}; overall: "
                  f"{'PASS' if exactness['passed'] else 'FAIL'}"]  # fmt: skip
    smoke = parts.get("sharded_smoke", {}).get("result")
    if smoke and smoke["rows"]:
        header = list(smoke["rows"][0])
        lines += ["", "## Sharded smoke (benchmarks/sharded_smoke.py)", "",
                  markdown_table(header, [list(row.values()) for row in smoke["rows"]])]  # fmt: skip
    errors = [(name, entry["error"]) for name, entry in parts.items() if "error" in entry]
    for name, entry in parts.items():
        errors += [(f"{name} {arm}", row["error"]) for arm, row in entry.get("result", {}).get("arms", {}).items()
                   if "error" in row]  # fmt: skip
    errors += [(name, text) for name, text in report.get("setup_errors", {}).items()]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- **{name}**: `{gist(text)}` (full text in the JSON)" for name, text in errors]
    lines += ["", "## Left out", ""] + [f"- {name}: {why}" for name, why in LEFT_OUT.items()]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main
def setup(report: dict, args: argparse.Namespace, site: Path) -> dict[str, str]:
    """Wheels, versions, device, commit and matmul rate into ``report``; returns the workers' env."""
    errors = report["setup_errors"]
    try:
        report["wheels"] = install_missing_wheels(args.wheels, site)
    except Exception as err:
        errors["wheels"] = describe(err)
    python_path = [str(REPO / "src"), str(site), os.environ.get("PYTHONPATH", "")]
    env = {**WORKER_ENV, "PYTHONPATH": os.pathsep.join(p for p in python_path if p)}
    import torch

    report["versions"] = versions()
    report["device"] = torch.cuda.get_device_name() if args.plan.device == "cuda" else "CPU"
    report["commit"] = git_commit()
    try:
        report["matmul_tflops"] = matmul_tflops(args.plan.device)
    except Exception as err:
        errors["matmul"] = describe(err)
    free_device_memory()
    print(f"{report['device']}; {wheels_line(report['wheels'])}; " + ", ".join(f"{k} {v}" for k, v in
          report["versions"].items()), flush=True)  # fmt: skip
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "exactness":
        write_result(args.result, exactness_worker(args))
        return 0
    plan = args.plan
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "_start": time.monotonic(),
        "mode": "cpu dry run" if args.cpu_dry_run else "gpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget_s": plan.budget_s,
        "plan": dataclasses.asdict(plan),
        "setup_errors": {},
        "wheels": {},
        "versions": {},
        "device": "unknown",
        "commit": "unknown",
        "parts": {},
        "left_out": LEFT_OUT,
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        site = Path(scratch) / "site"
        worker_env = setup(report, args, site)
        write_report(args.out, report)
        context = Context(plan, Path(scratch), worker_env, report["_start"] + plan.budget_s)
        context.matmul_tflops = report.get("matmul_tflops", float("nan"))
        parts: list[tuple[str, float, Callable[[float], dict]]] = [
            ("exactness", plan.exactness_cap_s, lambda deadline: exactness_part(context, deadline))
        ]
        parts += [(run.name, run.cap_s, dpo_runner(context, run)) for run in plan.early_dpo]
        parts.append(("sharded_smoke", plan.smoke_cap_s, lambda d: sharded_smoke_part(context, d)))
        parts += [(run.name, run.cap_s, dpo_runner(context, run)) for run in plan.late_dpo]
        for name, cap_s, work in parts:
            run_part(report, name, cap_s, work)
            write_report(args.out, report)
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME} "
          f"({time.monotonic() - report['_start']:.0f} s)")  # fmt: skip
    return 0


def dpo_runner(context: Context, run: DpoRun) -> Callable[[float], dict]:
    return lambda deadline: dpo_part(context, run, deadline)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="folder (default: $OUT)")
    parser.add_argument(
        "--wheels", type=Path, default=BENCHMARKS / "wheels", help="wheels to install where missing"
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same parts, tiny model, on the CPU")
    parser.add_argument("--budget-s", type=float, help="seconds for all parts (default 470; dry run 300)")
    # the exactness worker's own arguments (set by the parent; run_worker adds --result and --scratch)
    parser.add_argument("--worker", choices=("exactness",), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-prompt", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-completion", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.out is None:
        parser.error("--out is required where $OUT is not set")
    plan = DRY_PLAN if args.cpu_dry_run else GPU_PLAN
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on the GPU machine, or --cpu-dry-run here")
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    args.plan = plan
    return args


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
