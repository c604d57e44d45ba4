"""Output-head log-probs, forward + backward: full logits vs checkpointed chunks vs the fused backward.

    python benchmarks/logprob_head.py                       # SmolLM2-135M's head: H=576, V=49152
    python benchmarks/logprob_head.py --tokens 512 2048 --hidden 576 --vocab 49152 --repeats 5

For each token count N it times ``log p(targets)`` of N hidden states through a linear head and the
backward to the hidden states and the head weight, three ways, alternating within each repeat so the
machine's noise falls on all of them alike:

* ``full``: [N, V] logits, float32 log-softmax, gather (what a naive implementation does);
* ``checkpoint``: the previous lean path, each [chunk, V] block under ``torch.utils.checkpoint``;
* ``fused``: ``distalign.models.fused_head`` (one recompute per chunk, gradients written directly).

It reports median seconds, the ratio to ``full``, and the bytes autograd keeps for backward (what the
approach holds between forward and backward; the fused and checkpointed paths never keep a [N, V]
block). Values and gradients of the three agree (checked each run; float32 tolerance printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import environment_note, markdown_table  # noqa: E402

from distalign.models import token_logprobs as logprobs_module  # noqa: E402
from distalign.models.fused_head import fused_head_logprobs  # noqa: E402


def full_logits(features, head, targets, chunk_size):
    logits = head(features).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def checkpointed(features, head, targets, chunk_size):
    wrapped = torch.nn.Sequential(head)  # not a plain Linear: the lean path checkpoints each chunk
    return logprobs_module._chunked_token_logprobs(wrapped, None, features, targets, chunk_size)


def fused(features, head, targets, chunk_size):
    return fused_head_logprobs(features, head, targets, None, chunk_size)


METHODS = {"full": full_logits, "checkpoint": checkpointed, "fused": fused}


def run_once(method, features, head, targets, chunk_size):
    """Seconds for forward + backward, the bytes saved for backward, and the gradients."""
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    features.grad, head.weight.grad = None, None
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = method(features, head, targets, chunk_size)
    logps.sum().backward()
    seconds = time.perf_counter() - start
    # Features and the weight are inputs every approach keeps; count only what the approach adds.
    shared = features.numel() * features.element_size() + head.weight.numel() * head.weight.element_size()
    extra = max(0, sum(saved) - shared)
    return seconds, extra, logps.detach(), features.grad.clone(), head.weight.grad.clone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    rows = []
    for tokens in args.tokens:
        features = (torch.randn(tokens, args.hidden) * 0.5).requires_grad_()
        targets = torch.randint(0, args.vocab, (tokens,))
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        extra: dict[str, int] = {}
        results = {}
        for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
            for name, method in METHODS.items():
                seconds, saved, *outputs = run_once(method, features, head, targets, args.chunk_size)
                if repeat:
                    times[name].append(seconds)
                extra[name], results[name] = saved, outputs
        worst = max(
            float((a - b).abs().max())
            for name in ("checkpoint", "fused")
            for a, b in zip(results[name], results["full"])
        )
        base = statistics.median(times["full"])
        for name in METHODS:
            median = statistics.median(times[name])
            rows.append([tokens, name, f"{median:.3f}", f"{median / base:.2f}", f"{extra[name] / 2**20:.1f}"])
        print(f"N={tokens}: max |difference| to full logits (values and gradients): {worst:.2e}", flush=True)
    header = ["tokens", "method", "fwd+bwd s (median)", "x full", "kept for backward (MB)"]
    print(markdown_table(header, rows))
    print(environment_note(args.threads))
    print(f"head {args.hidden} x {args.vocab}, float32, chunk {args.chunk_size}, {args.repeats} repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
