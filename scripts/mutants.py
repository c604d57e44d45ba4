"""Planted bugs: does the suite catch each one?

Each planted bug is a small textual change to one source file, named after the joint it breaks. For
each, this script copies the working tree to a scratch folder, plants the bug there, runs the tests
that claim to cover that joint against the scratch copy, and reports whether at least one failed
("caught") or all passed ("SURVIVED"). The working tree is never modified.

    .venv/bin/python scripts/mutants.py               # every planted bug (about 2 minutes on 2 cores)
    .venv/bin/python scripts/mutants.py no_resume     # one or more by name
    .venv/bin/python scripts/mutants.py --list

Add a planted bug whenever a review finds a joint no test covers, with the tests that should catch
it; the script exits 1 while any survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PlantedBug:
    name: str
    what: str
    path: str
    original: str
    planted: str
    tests: tuple[str, ...]


RESUME_TESTS = (
    "tests/train/test_invariance.py::test_interrupted_and_resumed_run_equals_uninterrupted",
    "tests/train/test_seams.py::test_resume_restores_aggregator_state_exactly",
    "tests/train/test_robust_runs.py::test_group_dro_resume_is_exact",
    "tests/online/test_online_runs.py::test_interrupted_and_resumed_run_equals_the_uninterrupted_run",
)
PASSTHROUGH = "tests/train/test_option_passthrough.py"

BUGS = [
    PlantedBug(
        "no_resume",
        "a run never resumes: every 'resumed' run restarts from step 0",
        "src/distalign/train/engine.py",
        "        plan = self.run_plan\n        if plan.resume is None:\n            return None",
        "        plan = self.run_plan\n        if True:\n            return None",
        RESUME_TESTS,
    ),
    PlantedBug(
        "upo_advantage_ignores_value",
        "UPO's advantage is r_aux instead of r_aux - V",
        "src/distalign/losses/upo.py",
        "    residuals = rewards - values\n",
        "    residuals = rewards - 0 * values\n",
        ("tests/losses/test_upo.py",),
    ),
    PlantedBug(
        "aggregator_options_dropped",
        "the objective is built without the config's aggregator options",
        "src/distalign/train/objective.py",
        "        aggregator_options=config.aggregator.options(),",
        "        aggregator_options={},",
        (f"{PASSTHROUGH}::test_a_non_default_option_changes_the_run_and_its_card", "-k", "aggregator"),
    ),
    PlantedBug(
        "loss_options_dropped",
        "the objective is built without the config's loss options",
        "src/distalign/train/objective.py",
        "        loss_options=config.loss.loss_options(),",
        "        loss_options={},",
        (f"{PASSTHROUGH}::test_a_non_default_option_changes_the_run_and_its_card", "-k", "loss-dpo-"),
    ),
    PlantedBug(
        "micro_batch_losses_summed",
        "gradient accumulation sums the micro-batch losses instead of taking their weighted mean",
        "src/distalign/train/offline.py",
        "                    share = result.loss * data.weight_total(rows) / global_weight",
        "                    share = result.loss",
        ("tests/train/test_invariance.py::test_dpo_gradient_is_independent_of_micro_batching",),
    ),
    PlantedBug(
        "grouping_by_length_loses_a_row",
        "data.group_by_length regroups the batch with one row lost and another counted twice",
        "src/distalign/train/batching.py",
        "        order = sorted(range(len(rows)), key=lambda i: -lengths[i])",
        "        order = sorted(range(len(rows)), key=lambda i: -lengths[i])\n        order[-1] = order[0]",
        ("tests/train/test_packing.py", "-k", "group_by_length"),
    ),
    PlantedBug(
        "self_bleu_ignores_seed_and_max_refs",
        "self-BLEU compares every text with all others, whatever seed and max_refs say",
        "src/distalign/stats/diversity.py",
        "        if max_refs is not None and len(others) > max_refs:",
        "        if False:",
        ("tests/eval/test_metrics.py",),
    ),
    PlantedBug(
        "dpo_sign_flipped",
        "DPO's margin enters with the wrong sign (a loss sign flip)",
        "src/distalign/losses/preference.py",
        "    logits = beta * (chosen_logratios - rejected_logratios)\n    loss = -F.logsigmoid(logits)",
        "    logits = beta * (rejected_logratios - chosen_logratios)\n    loss = -F.logsigmoid(logits)",
        ("tests/losses/test_preference_math.py", "tests/losses/test_preference_objectives.py"),
    ),
    PlantedBug(
        "mean_ignores_weights",
        "the mean aggregator ignores the rows' weights",
        "src/distalign/losses/aggregators.py",
        "    return LossResult(weighted_mean(losses, weights))",
        "    return LossResult(losses.mean())",
        ("tests/losses/test_aggregators.py",),
    ),
    PlantedBug(
        "forward_kl_is_reverse_kl",
        "forward KL's pseudo-reward is reverse KL's (a divergence swapped)",
        "src/distalign/losses/fdivergence.py",
        "def _forward_kl_reward(log_ratio: torch.Tensor) -> torch.Tensor:\n    return torch.exp(-log_ratio)",
        "def _forward_kl_reward(log_ratio: torch.Tensor) -> torch.Tensor:\n    return -log_ratio - 1",
        ("tests/fdpg/test_fdivergence.py", "tests/fdpg/test_toy_gradients.py"),
    ),
]


def scratch_copy(destination: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as the tests see them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        relative = raw.decode()
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def plant(copy: Path, bug: PlantedBug) -> None:
    path = copy / bug.path
    text = path.read_text()
    if text.count(bug.original) != 1:
        raise SystemExit(
            f"{bug.name}: the text to replace is not found exactly once in {bug.path}; update BUGS"
        )
    path.write_text(text.replace(bug.original, bug.planted))


def run_tests(copy: Path, bug: PlantedBug) -> tuple[bool, float, str]:
    """Run ``bug.tests`` against the scratch copy, stopping at the first failure: (caught, seconds, the
    test that failed, or the end of pytest's output when none did)."""
    # The scratch copy's src/ comes first on the path, ahead of the editable install of ROOT.
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    check = subprocess.run(
        [sys.executable, "-c", "import distalign; print(distalign.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    if not check.stdout.strip().startswith(str(copy)):
        raise SystemExit(f"the scratch copy is not the one imported: {check.stdout or check.stderr}")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-rf", "-p", "no:cacheprovider", *bug.tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    failed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    # pytest exits 1 when a test failed; 2-5 (interrupted, internal error, usage, nothing collected)
    # mean the tests never judged the bug, which counts as not caught.
    if result.returncode == 1 and failed:
        return True, seconds, failed[0]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return False, seconds, (lines[-1] if lines else result.stderr[-300:])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="planted bugs to try (default: all)")
    parser.add_argument("--list", action="store_true", help="list the planted bugs and exit")
    args = parser.parse_args()
    if args.list:
        for bug in BUGS:
            print(f"{bug.name:38} {bug.what}")
        return 0
    unknown = set(args.names) - {bug.name for bug in BUGS}
    if unknown:
        print(f"unknown planted bug(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    chosen = [bug for bug in BUGS if not args.names or bug.name in args.names]
    rows = []
    for bug in chosen:
        with tempfile.TemporaryDirectory(prefix=f"distalign-mutant-{bug.name}-") as scratch:
            copy = Path(scratch)
            scratch_copy(copy)
            plant(copy, bug)
            caught, seconds, last = run_tests(copy, bug)
        rows.append((bug, caught, seconds, last))
        print(f"{bug.name}: {'caught' if caught else 'SURVIVED'} ({seconds:.0f} s): {last}", flush=True)
    print("\n| planted bug | what it breaks | tests run | first test that failed |\n|---|---|---|---|")
    for bug, caught, _, last in rows:
        tests = " ".join(f"`{t}`" if not t.startswith("-") else t for t in bug.tests)
        print(
            f"| `{bug.name}` | {bug.what} | {tests} | {f'`{last}`' if caught else f'**survived** ({last})'} |"
        )
    return 0 if all(caught for _, caught, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
