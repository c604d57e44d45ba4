"""The cost of drawing one next token per row: log_softmax + torch.multinomial vs distalign's draw.

distalign's sampler draws each decoded token with ``distalign.models.token_draw.draw_from_logits``
(softmax, then a two-level inverse CDF with one uniform per row); before, it took log_softmax and
``torch.multinomial``. Both are exact; this times them on random logits of the tiny model's vocabulary
(512) and SmolLM2's (49,152), 32 rows (a decode step of 8 prompts x 4 samples), one thread, alternating,
and prints medians and their ratio.

    python benchmarks/token_draw.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_utils import command_line, environment_note, load_average, markdown_table

from distalign.models.token_draw import draw_from_logits


def multinomial_draw(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """What the sampler did before: log-probs, then torch.multinomial on their exponential."""
    log_probs = torch.log_softmax(logits, dim=-1)
    tokens = torch.multinomial(torch.exp(log_probs), 1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 49152])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"$ {command_line()}\nload average before: {load_average()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for vocab in args.vocab:
        logits = torch.randn(args.rows, vocab, generator=generator) * 3
        draws = {"multinomial": multinomial_draw, "distalign": draw_from_logits}
        seconds: dict[str, list[float]] = {name: [] for name in draws}
        for repeat in range(args.repeats):
            for name in draws if repeat % 2 == 0 else reversed(list(draws)):
                started = time.perf_counter()
                draws[name](logits, generator)
                seconds[name].append(time.perf_counter() - started)
        old, new = (statistics.median(seconds[name]) * 1e3 for name in draws)
        rows.append([vocab, args.rows, old, new, new / old])
    print(f"load average after: {load_average()}")
    header = ["vocabulary", "rows", "log_softmax + multinomial ms", "draw_from_logits ms", "ratio"]
    print(markdown_table(header, rows))
    print(environment_note())


if __name__ == "__main__":
    main()
