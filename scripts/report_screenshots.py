"""Screenshots of the HTML report for the docs, taken with headless Chromium.

    python scripts/report_screenshots.py RUN_DIR [RUN_DIR ...] [--out docs/images]

Writes the report of the runs into a temporary directory, then ``report_top.png`` (the top of the page,
1300 x 2400) and ``report_generations.png`` (the example generations, cut to 1120 px high) into --out.
The docs' pictures come from four runs of the SmolLM2 UPO sweep (``distalign sweep
configs/sweeps/upo_smollm2.yaml``): ``runs/upo/sweep/{dpo,dpo_relabel,modpo,upo-lambda_aux=1.0}``. Two tiny
runs give a quick check of the layout:

    distalign train configs/quickstart.yaml train.max_steps=8 train.log_every=1 output_dir=/tmp/shots/dpo
    distalign train configs/quickstart.yaml train.max_steps=40 train.log_every=2 loss.name=ipo \\
        loss.beta=0.5 output_dir=/tmp/shots/ipo
    distalign eval /tmp/shots/dpo eval.num_prompts=8 eval.samples_per_prompt=2 eval.max_new_tokens=16
    distalign eval /tmp/shots/ipo eval.num_prompts=8 eval.samples_per_prompt=2 eval.max_new_tokens=16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.browser import probe_page, screenshot

from distalign.eval.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        page = write_report(args.run_dirs, Path(tmp) / "report.html")
        seen = probe_page(page)
        if seen["errors"] or seen["console"]:
            raise SystemExit(f"the page has errors: {seen['errors'] + seen['console']}")
        shots = {
            "report_top": (screenshot(page, out / "report_top.png"), None),
            "report_generations": (
                screenshot(page, out / "report_generations.png", section="generations"),
                1120,
            ),
        }
    for path, height in shots.values():
        image = Image.open(path).convert("RGB")
        if height is not None:
            image = image.crop((0, 0, image.width, height))
        # 256 colours keep the run colours exact on this flat page and make the file 3-4 times smaller.
        image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
