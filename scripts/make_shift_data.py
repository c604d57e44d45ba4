"""Sample a large distribution-shift dataset with SmolLM2, resumably (docs/robust.md, "The built-in shift task").

    nohup nice -n 19 .venv/bin/python scripts/make_shift_data.py --out-dir runs/shift_wide \\
        > runs/shift_wide/gen.log 2>&1 &

Defaults: task ``sentiment`` with ``pool=large`` (1250 train prompts, 1000 of them used), source set
``wide`` (golden, hot, cold, pirate: 250 prompts each), ``k=3`` completions per prompt, 48 new tokens,
seed 0.
Each source's prompts are sampled in chunks of ``--chunk-size``; every finished chunk is saved under
``OUT_DIR/chunks/``, so running the same command again after a kill continues where it stopped (and
gives the same rows as an uninterrupted run). At the end it writes ``OUT_DIR/shift_wide.jsonl`` (paired
conversational rows with ``source``, ``group``, ``label_flipped``, ``chosen_reward``,
``rejected_reward``), its ``.provenance.json`` and prints the pairs per source.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/shift_wide")
    parser.add_argument("--name", default="shift_wide", help="the JSONL is OUT_DIR/NAME.jsonl")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--task-setting", action="append", default=None, metavar="NAME=VALUE")
    parser.add_argument("--sources", default="wide")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from distalign.models.loading import load_model_and_tokenizer
    from distalign.tasks.base import get_task
    from distalign.tasks.builders import select_prompts, to_conversational
    from distalign.tasks.io import write_jsonl_with_provenance
    from distalign.tasks.sampler import model_device, model_sample_fn
    from distalign.tasks.shift import SOURCE_SETS, shift_provenance, source_task
    from distalign.tasks.shift_chunks import build_shift_dataset_chunked

    torch.set_num_threads(args.threads)
    settings = dict(item.split("=", 1) for item in (args.task_setting or ["pool=large"]))
    task = get_task(args.task, **settings)
    sources = SOURCE_SETS[args.sources]
    out_dir = Path(args.out_dir)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model = model.to(model_device())
    sampling = {
        "method": "ancestral per source temperature, chat template, one seeded sampler per chunk",
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }

    def make_sampler(source, sampler_seed):
        return model_sample_fn(
            model,
            tokenizer,
            source_task(task, source),  # renders the source's hidden system prompt / instruction
            use_chat_template=True,
            max_new_tokens=args.max_new_tokens,
            seed=sampler_seed,
            batch_size=args.batch_size,
            description=f"  {source.name} chunk",
            temperature=source.temperature,
        )

    total = len(select_prompts(task, num_prompts=args.num_prompts, seed=args.seed))
    bar = tqdm(total=total, desc=f"{args.name}: prompts", unit="prompt")
    started, sampled = time.perf_counter(), [0]

    def on_chunk(source: str, prompts: int, loaded: bool) -> None:
        bar.update(prompts)
        if not loaded:
            sampled[0] += prompts
            rate = (time.perf_counter() - started) / sampled[0]
            bar.set_postfix(source=source, s_per_prompt=f"{rate:.2f}")

    rows, counts = build_shift_dataset_chunked(
        task,
        make_sampler,
        out_dir / "chunks",
        sources=sources,
        k=args.k,
        seed=args.seed,
        num_prompts=args.num_prompts,
        label_noise=args.label_noise,
        chunk_size=args.chunk_size,
        sampling=sampling,
        on_chunk=on_chunk,
    )
    bar.close()
    elapsed = time.perf_counter() - started
    counts["sampled_prompts_this_run"] = sampled[0]
    counts["seconds_this_run"] = round(elapsed, 1)
    provenance = shift_provenance(
        task,
        sources,
        model=args.model,
        sampling={**sampling, "chunk_size": args.chunk_size, "threads": args.threads},
        seed=args.seed,
        settings={"k": args.k, "num_prompts": total, "label_noise": args.label_noise, "split": "train"},
        counts=counts,
    )
    path = write_jsonl_with_provenance(
        to_conversational(task, rows), out_dir / f"{args.name}.jsonl", provenance
    )
    print(json.dumps({"output": str(path), **counts}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
