"""Does switching a model to span attention slow its sampling? It should not: without spans the
implementation is transformers' SDPA attention behind one more Python call. SmolLM2-135M-Instruct,
32 rows of 40 prompt tokens, 32 sampled tokens each, 1 thread, the two settings alternating.

    python benchmarks/span_attention_sampling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from distalign.models.loading import load_model_and_tokenizer
from distalign.models.span_attention import use_span_attention


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model_and_tokenizer("smollm2")
    model.eval()
    prompts = torch.randint(100, 40000, (32, 40), generator=torch.Generator().manual_seed(0))

    def sample_seconds() -> float:
        torch.manual_seed(0)
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, min_new_tokens=32,
                do_sample=True, top_k=0, top_p=1.0,
            )  # fmt: skip
        return time.perf_counter() - started

    sample_seconds()  # warm-up
    times: dict[str, list[float]] = {"sdpa": [], "span attention": []}
    for repetition in range(args.repeats):
        order = list(times) if repetition % 2 == 0 else list(times)[::-1]
        for name in order:
            if name == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                use_span_attention(model)
            times[name].append(sample_seconds())
    for name, seconds in times.items():
        print(
            f"{name:15s} "
            + " ".join(f"{s:.2f}" for s in seconds)
            + f"  median {sorted(seconds)[len(seconds) // 2]:.2f} s"
        )


if __name__ == "__main__":
    main()
