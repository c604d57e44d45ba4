"""Does the vLLM engine sample from the model distalign's head computes? A GPU check of the vLLM sampler
(``online.sampler: vllm``, docs/vllm.md), with the CPU engine as a stand-in where vLLM is absent.

1. fidelity: a policy pi != a (LoRA with random B, pushed merged into the engine) draws N completions;
   with exact sampling from pi, the mean of a(x)/pi(x) over them is 1 (E_pi[a/pi] = 1; the same with
   distalign's sampler, printed beside it), and the engine's own log-prob of each draw equals our
   head's log pi up to kernel rounding (``gap``). With ``--top-p`` < 1 (vLLM only) the same means are
   printed for truncated draws, with our head's log pi and with vLLM's renormalised log-probs, to show
   the bias the config refuses;
2. speed: seconds to draw the N completions with the engine and with distalign's sampler;
3. the loop: a few steps of ``train_online`` on-policy and off-policy (sync_every 2) through the
   engine, with the per-step ``sampler/*`` metrics (weight pushes, log-prob gap).

    python benchmarks/vllm_sampler_check.py --engine vllm --model smollm2 --samples 2048
    python benchmarks/vllm_sampler_check.py --engine cpu --model tiny --samples 64 --steps 2   # logic only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.engines import CpuEngine
from distalign_testing.runs import read_metrics

from distalign.config import load_config
from distalign.models.reference import adapters_disabled
from distalign.models.sampling import eos_token_ids, sample_completions, score_completions
from distalign.train.online import train_online
from distalign.train.online.samplers import EngineSampler
from distalign.train.online.setup import load_prompts, repeat_prompts
from distalign.train.setup import load_policy


def _config(args, output_dir: str, *extra: str):
    return load_config(
        "configs/fdpg_pointwise.yaml",
        [
            f"model.name={args.model}",
            f"online.max_new_tokens={args.max_new_tokens}",
            "train.log_every=1",
            "train.save_every=0",
            "train.progress=false",
            "online.eval_every=0",
            f"output_dir={output_dir}",
            *extra,
        ],
    )


def _engine(args, policy, tokenizer, max_model_len: int):
    if args.engine == "cpu":
        return CpuEngine(policy, tokenizer)
    from distalign.models.vllm_engine import build_vllm_engine

    return build_vllm_engine(
        policy,
        tokenizer,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=max_model_len,
        seed=0,
    )


def _ratio_mean(log_ratio: torch.Tensor) -> dict[str, float]:
    """Mean of exp(log_ratio), its standard error and the z-score of (mean - 1)."""
    ratio = log_ratio.double().exp()
    mean, stderr = float(ratio.mean()), float(ratio.std() / math.sqrt(len(ratio)))
    return {"mean": mean, "stderr": stderr, "z": (mean - 1.0) / stderr if stderr > 0 else 0.0}


def fidelity_and_speed(args) -> tuple[dict, object]:
    config = _config(args, tempfile.mkdtemp())
    policy, tokenizer = load_policy(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pi != a: random adapters (B = 0 at initialisation would give pi = a)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * args.lora_scale)
    prompts = load_prompts(config, tokenizer, "train")
    chosen = list(range(min(len(prompts), args.prompts)))
    indices, groups = repeat_prompts(chosen, args.samples // len(chosen))
    engine = _engine(args, policy, tokenizer, config.online.prompts.max_prompt_length + args.max_new_tokens)
    sampler = EngineSampler(
        engine, tokenizer, eos_token_ids(policy, tokenizer), max_new_tokens=args.max_new_tokens, seed=0
    )
    sampler.sync(policy, "pi")
    start = time.perf_counter()
    rollout = sampler.draw(policy, prompts, indices, groups, step=1, rank=0)
    engine_seconds = time.perf_counter() - start

    def head(completions, adapters_on=True):
        keys, ids = [prompts.keys[i] for i in indices], [prompts.ids[i] for i in indices]
        if adapters_on:
            return score_completions(policy, tokenizer, keys, completions, 32, prompt_ids=ids).double()
        with adapters_disabled(policy):
            return score_completions(policy, tokenizer, keys, completions, 32, prompt_ids=ids).double()

    log_pi, log_a = head(rollout.completion_ids), head(rollout.completion_ids, adapters_on=False)
    gap = (rollout.engine_logps - log_pi).abs()
    start = time.perf_counter()
    hf = sample_completions(
        policy,
        tokenizer,
        [prompts.keys[i] for i in indices],
        prompt_ids=[prompts.ids[i] for i in indices],
        max_new_tokens=args.max_new_tokens,
        batch_size=64,
        generator=torch.Generator(device=device).manual_seed(1),
    )
    hf_seconds = time.perf_counter() - start
    result = {
        "samples": len(rollout),
        "engine_a_over_pi": _ratio_mean(log_a - log_pi),
        "hf_a_over_pi": _ratio_mean(head(hf.completion_ids, adapters_on=False) - hf.logprobs.double()),
        "gap_mean_abs": float(gap[torch.isfinite(gap)].mean()) if torch.isfinite(gap).any() else None,
        "gap_max_abs": float(gap[torch.isfinite(gap)].max()) if torch.isfinite(gap).any() else None,
        "engine_seconds": engine_seconds,
        "hf_seconds": hf_seconds,
        "engine_eos_fraction": float(rollout.ended_with_eos.double().mean()),
        "hf_eos_fraction": float(hf.ended_with_eos.double().mean()),
    }
    if args.top_p < 1.0 and args.engine == "vllm":
        result["top_p"] = truncated(args, engine, prompts, indices, head)
    return result


def truncated(args, engine, prompts, indices, head) -> dict:
    """Draws at top-p < 1 straight from vLLM (the sampler refuses them): a/pi with our head's log pi,
    and with vLLM's renormalised log-probs as log q."""
    vllm = engine._vllm
    params = vllm.SamplingParams(
        n=1, top_p=args.top_p, max_tokens=args.max_new_tokens, logprobs=0, seed=7, detokenize=False
    )
    outputs = engine._llm.generate(
        [{"prompt_token_ids": prompts.ids[i]} for i in indices], params, use_tqdm=False
    )
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    log_q_vllm = torch.tensor([o.outputs[0].cumulative_logprob for o in outputs], dtype=torch.float64)
    log_pi, log_a = head(completions), head(completions, adapters_on=False)
    return {
        "a_over_pi_head": _ratio_mean(log_a - log_pi),
        "a_over_q_vllm": _ratio_mean(log_a - log_q_vllm),
        "pi_head_over_q_vllm": _ratio_mean(log_pi - log_q_vllm),
    }


def loop(args) -> dict:
    """A few online steps through the engine, on-policy and off-policy with sync_every 2."""
    runs = {
        "on_policy": ["online.sampler=vllm"],
        "offline_sync_every_2": [
            "online.sampler=vllm",
            "online.proposal=offline",
            "online.vllm.sync_every=2",
        ],
    }
    result = {}
    for name, overrides in runs.items():
        config = _config(args, tempfile.mkdtemp(), f"train.max_steps={args.steps}", *overrides)
        engine = None
        if args.engine == "cpu":
            policy, tokenizer = load_policy(config)
            engine = CpuEngine(policy, tokenizer)
        records = read_metrics(train_online(config, generation_engine=engine))
        keep = ("step", "loss", "time/sync", "time/sample", "time/step", "is/ess_fraction")
        result[name] = [
            {k: v for k, v in r.items() if k.startswith("sampler/") or k in keep} for r in records
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["vllm", "cpu"], default="vllm")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lora-scale", type=float, default=0.02, help="std of the random LoRA B entries")
    parser.add_argument("--top-p", type=float, default=0.8, help="vLLM only: also measure truncated draws")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-loop", action="store_true")
    args = parser.parse_args()
    result = {"fidelity": fidelity_and_speed(args)}
    if not args.skip_loop:
        result["loop"] = loop(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
