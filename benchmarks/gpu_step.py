"""One offline DPO step on a GPU: tokens/s and model-FLOP utilisation (MFU), distalign padded and
packed against TRL's DPOTrainer, on a 0.5B-1.5B-shaped model built from a config (no download).

    python benchmarks/gpu_step.py                                  # qwen2-0.5b shape, 1024/2048/4096
    python benchmarks/gpu_step.py --shape qwen2-1.5b --lengths 2048
    python benchmarks/gpu_step.py --quick                          # tiny shape, any device: checks it runs

The model is a randomly initialised Qwen2 of the named shape (float32 weights, tied embeddings, full
attention), saved once with a small byte-level BPE tokenizer trained locally: its token ids cover
only the tokenizer's few hundred entries, which changes no FLOP count (every position still goes
through the full 151,936-way output layer). Rows are mixed-length pairs whose prompt and both
completions are drawn per row (prompt 1/8-3/8 of --length tokens, each completion 1/16-1/2 of it, so
prompt + completion never exceeds --length and nothing is truncated): the realistic case, where a
padded micro-batch wastes positions and packing does not.

Both frameworks run the same rows, global batch, micro-batch and steps; sigmoid DPO, beta 0.1; bf16
autocast over float32 weights; fused AdamW; no gradient checkpointing; the reference log-probs
precomputed before the first step (not timed); SDPA attention (transformers' default: no
flash-attention package is needed). Runs are fresh processes (offline_vs_trl.py's workers), the arms
alternate, and the first --warmup steps are not timed; every step ends with a device synchronise.

MFU counts the FLOPs a DPO step needs, the same formula for both frameworks, divided by the device's
bf16 matrix-multiply rate measured in this run (8192^3 products) and by the datasheet's dense bf16
peak (--peak-tflops; H100/H200 SXM: 989):
  per sequence of s tokens with c completion tokens, forward + backward (3x the forward):
  6 x (transformer-block parameters) x s     the linear layers
  + 6 x layers x hidden x s^2 / 2 x 2        causal attention scores and values (half the square)
  + 6 x hidden x vocab x c                   the output layer on the completion (the log-probs a
                                             DPO loss needs; TRL computes it for every position, so
                                             its extra work is not counted as useful)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import command_line, environment_note, load_average, markdown_table, run_worker  # noqa: E402

# Qwen2 shapes (hidden, MLP, layers, heads, key/value heads, vocabulary); tied embeddings as in the
# released 0.5B and 1.5B models.
SHAPES = {
    "qwen2-0.5b": dict(hidden=896, mlp=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "qwen2-1.5b": dict(hidden=1536, mlp=8960, layers=28, heads=12, kv_heads=2, vocab=151936),
    "tiny": dict(hidden=64, mlp=256, layers=2, heads=4, kv_heads=2, vocab=1024),
}
# label -> (framework, packing)
ARMS = {"distalign": ("distalign", False), "distalign packed": ("distalign", True), "trl": ("trl", False)}


# ------------------------------------------------------------------------------------------ inputs
def build_model(shape: dict, max_length: int, path: Path) -> Path:
    """Save a random Qwen2 of ``shape`` with the locally trained tiny tokenizer to ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distalign.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(max_length, 4096),
        tie_word_embeddings=True,
        use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mixed_length_pairs(
    tokenizer_path: Path, path: Path, rows: int, length: int, seed: int = 0
) -> list[tuple]:
    """Write ``rows`` pairs of mixed lengths (see the module docstring); return each row's
    (prompt, chosen, rejected) token counts, EOS included in the completions.

    Byte-level BPE splits text into words before merging, so a text's token count is the sum of its
    words' counts: texts of an exact length are assembled word by word."""
    from transformers import AutoTokenizer

    from distalign.models.tiny import tiny_corpus

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    words = sorted({w for line in tiny_corpus() for w in line.split()})
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    ones = [w for w in words if cost[w] == 1]  # to land exactly on the target count
    rng = random.Random(seed)

    def text_of(count: int) -> str:
        picked, total = [], 0
        while total < count:
            word = rng.choice(words if count - total > 8 else ones)
            if total + cost[word] <= count:
                picked.append(word)
                total += cost[word]
        return " " + " ".join(picked)

    counts = []
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = rng.randint(length // 8, 3 * length // 8)
            chosen, rejected = (rng.randint(max(2, length // 16), length // 2) for _ in range(2))
            record = {
                "prompt": text_of(prompt),
                "chosen": text_of(chosen - 1),
                "rejected": text_of(rejected - 1),
            }
            handle.write(json.dumps(record) + "\n")
            counts.append((prompt, chosen, rejected))
    return counts


# -------------------------------------------------------------------------------------------- FLOPs
def block_parameters(shape: dict) -> int:
    """Parameters of the transformer blocks (attention and MLP projections; norms are negligible)."""
    head_dim = shape["hidden"] // shape["heads"]
    q_and_o = 2 * shape["hidden"] * shape["hidden"] + shape["hidden"]  # q has a bias in Qwen2
    k_and_v = 2 * (shape["hidden"] * shape["kv_heads"] * head_dim + shape["kv_heads"] * head_dim)
    mlp = 3 * shape["hidden"] * shape["mlp"]
    return shape["layers"] * (q_and_o + k_and_v + mlp)


def dpo_step_flops(shape: dict, counts: list[tuple], steps: int) -> float:
    """Mean FLOPs per optimizer step of DPO (forward + backward of chosen and rejected) over the rows."""
    blocks = block_parameters(shape)
    total = 0.0
    for prompt, *completions in counts:
        for completion in completions:
            s = prompt + completion
            total += 6 * blocks * s + 6 * shape["layers"] * shape["hidden"] * s * s / 2
            total += 6 * shape["hidden"] * shape["vocab"] * completion
    return total / steps


def matmul_tflops(device: str) -> float:
    """This device's measured dense matrix-multiply rate (bf16 on a GPU, float32 on a CPU)."""
    import time

    import torch

    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


# ------------------------------------------------------------------------------------------ parent
def _worker_args(args: argparse.Namespace, arm: str, model: Path, data: Path, length: int) -> list[str]:
    framework, packing = ARMS[arm]
    values = {
        "--worker": framework, "--setting": "precomputed", "--model-path": model, "--data": data,
        "--batch": args.batch, "--micro": args.micro, "--steps": args.steps, "--warmup": args.warmup,
        "--lr": 1e-6, "--max-length": length, "--max-prompt": 3 * length // 8 + 1, "--precision": "bf16",
    }  # fmt: skip
    return [str(item) for pair in values.items() for item in pair] + (["--packing"] if packing else [])


def parent_main(args: argparse.Namespace) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[args.shape]
    print(f"$ {command_line()}")
    print(f"load average before: {load_average()}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    measured_peak = matmul_tflops(device)
    print(f"device: {device_name}; measured matmul rate {measured_peak:.1f} TFLOP/s", flush=True)
    worker_script = str(Path(__file__).resolve().parent / "offline_vs_trl.py")
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="distalign_gpu_step_") as scratch:
        model = build_model(shape, max(args.lengths), Path(scratch) / "model")
        for length in args.lengths:
            data = Path(scratch) / f"pairs_{length}.jsonl"
            counts = mixed_length_pairs(model, data, args.steps * args.batch, length)
            flops = dpo_step_flops(shape, counts, args.steps)
            tokens = sum(2 * p + c + r for p, c, r in counts) / args.steps
            results: dict[str, list[dict]] = {}
            arms = [arm for arm in ARMS if arm in args.arms]
            for repetition in range(args.repeats):
                for arm in arms if repetition % 2 == 0 else arms[::-1]:
                    try:
                        result = run_worker(
                            worker_script, _worker_args(args, arm, model, data, length), timeout=args.timeout
                        )
                    except RuntimeError as err:  # one arm failing (e.g. out of memory) keeps the others
                        print(f"  {length} {arm}: FAILED {str(err)[-600:]}", flush=True)
                        continue
                    results.setdefault(arm, []).append(result)
                    print(
                        f"  {length} tokens, {arm:17s} {result['s_per_step']:.3f} s/step, "
                        f"peak GPU {result.get('peak_gpu_mb') or 0:.0f} MB, tokens/pair "
                        f"{result['tokens_per_pair']:.0f} (rows: {tokens * args.steps / len(counts):.0f})",
                        flush=True,
                    )
            trl_s = statistics.median(r["s_per_step"] for r in results["trl"]) if "trl" in results else None
            for arm, runs in results.items():
                s_per_step = statistics.median(r["s_per_step"] for r in runs)
                achieved = flops / s_per_step / 1e12
                peak_gpu = statistics.median(r.get("peak_gpu_mb") or 0.0 for r in runs)
                rows_out.append([
                    length, arm, len(runs), s_per_step, tokens / s_per_step, achieved,
                    achieved / measured_peak, achieved / args.peak_tflops, peak_gpu,
                    trl_s / s_per_step if trl_s else "",
                ])  # fmt: skip
            # the table so far after every length: a run cut short still leaves its numbers
            print(f"\nload average: {load_average()}")
            print(
                f"shape={args.shape} ({block_parameters(shape) / 1e6:.0f}M block parameters) "
                f"batch={args.batch} pairs, micro-batch={args.micro}, steps={args.steps} (first "
                f"{args.warmup} not timed), repeats={args.repeats}; device {device_name}, matmul "
                f"{measured_peak:.0f} TFLOP/s measured, {args.peak_tflops:.0f} datasheet"
            )
            header = ["max tokens", "arm", "runs", "s/step", "tokens/s", "TFLOP/s", "MFU (measured peak)",
                      "MFU (datasheet)", "peak GPU MB", "speed vs TRL"]  # fmt: skip
            print(markdown_table(header, rows_out), flush=True)
    print(environment_note())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument(
        "--lengths",
        type=lambda text: [int(v) for v in text.split(",")],
        help="max tokens per sequence, comma-separated (default 1024,2048,4096)",
    )
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--batch", type=int, default=8, help="global batch (pairs)")
    parser.add_argument("--micro", type=int, default=2, help="pairs per forward")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 64/128 tokens, 3 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.warmup, args.batch = "tiny", 3, 1, 4
    args.lengths = args.lengths or ([64, 128] if args.quick else [1024, 2048, 4096])
    return args


if __name__ == "__main__":
    parent_main(parse_args(sys.argv[1:]))
