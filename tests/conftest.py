"""Project-wide test isolation: a private distalign cache per session and an offline hub."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports torch: idle OpenMP threads sleep instead of spinning, which keeps the
# suite fast when other jobs share the cores (the CLI sets the same default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Processes the tests start (accelerate launch -m distalign_testing.grad_probe, ...) find the test
# helpers, which are not installed; set for the whole session, since module-scoped fixtures launch too.
_HELPERS = str(Path(__file__).resolve().parents[1] / "testing")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_HELPERS, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_distalign_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests (and the subprocesses they start) never touch ~/.cache and never wait on the network.

    The caches are shared within the session so the tiny model is built once, and so is the op
    DeepSpeed compiles at startup on CPU (its shared-memory all-reduce). That build takes a lock file
    in its directory; a run killed while building leaves the lock behind, and every later DeepSpeed
    start in that directory waits for it forever (what hung CI in ~/.cache/torch_extensions).
    """
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("DISTALIGN_CACHE", str(base / "distalign-cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(base / "torch-extensions"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def single_thread_torch():
    """One intra-op thread for a module of tiny-tensor tests: as fast, and it does not fight parallel
    test runs for the cores. Directories of such tests request it from an autouse fixture."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_norms(monkeypatch):
    """Llama's RMSNorm computes in float32 even in a float64 model. A shared prompt's tokens receive the
    gradients of several completions summed before that float32 backward, separate copies each their
    own, so packed-with-shared-prompts and padded batches differ by float32 rounding (~1e-7) there
    alone; with the norm in the input dtype every op is float64 and the layouts agree to 1e-12."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    return _rms_norm_in_input_dtype


@pytest.fixture
def throwaway():
    """Register losses and aggregators for one test, each by one function, as a user would; they are
    unregistered afterwards. ``throwaway.loss(name, fn=None, **register_loss_kwargs)`` (default
    ``fn``: DPO per example) and ``throwaway.aggregator(name, fn, **register_aggregator_kwargs)``."""
    from distalign.losses import AGGREGATORS, LOSSES, register_aggregator, register_loss
    from distalign.losses.base import PerExampleLosses
    from distalign.losses.preference import dpo_loss, paired_inputs

    def dpo_per_example(stats, *, beta: float = 0.1):
        chosen, rejected = paired_inputs(stats, "throwaway", "logratios")
        return PerExampleLosses(dpo_loss(chosen, rejected, beta=beta))

    added = []

    class Registrar:
        def loss(self, name, fn=None, *, data_kind="paired", needs_reference=True, **kwargs):
            added.append((LOSSES, name))
            return register_loss(name, data_kind=data_kind, needs_reference=needs_reference, **kwargs)(
                fn or dpo_per_example
            )

        def aggregator(self, name, fn, *, batch_coupled=True, **kwargs):
            added.append((AGGREGATORS, name))
            return register_aggregator(name, batch_coupled=batch_coupled, **kwargs)(fn)

    yield Registrar()
    for registry, name in added:
        registry.remove(name)


@pytest.fixture
def plant_packing_bug(monkeypatch):
    """The control of a packed-equals-padded test: ``plant_packing_bug(module)`` replaces
    ``module.pack_sequences`` (the training path's packer, e.g. ``distalign.train.setup``) by one that
    leaves the last completion token of each batch's first sequence out of its log-prob, the
    off-by-one a packer can make. The setup probe packs through its own import and still passes, so the
    run trains: a comparison that cannot tell this run from the padded one proves nothing."""

    def plant(module) -> None:
        original = module.pack_sequences

        def drops_a_token(*args, **kwargs):
            from distalign.data.collate import predictor_positions

            batch = original(*args, **kwargs)
            first = (batch["sequence_index"] == 0) & batch["completion_mask"].bool()
            batch["completion_mask"][tuple(first.nonzero()[-1])] = 0
            # The batch stays self-consistent, as a buggy packer's would: its indices follow the mask.
            positions = predictor_positions(
                batch["completion_mask"], batch["sequence_index"], batch.get("group_index")
            )
            batch["target_positions"], batch["predictor_positions"] = positions
            return batch

        monkeypatch.setattr(module, "pack_sequences", drops_a_token)

    return plant


class DeviceReads:
    """Counts the calls that read a tensor's values back to the host (``item``, ``tolist``, ``cpu``,
    ``numpy``, ``float``/``int``/``bool`` of a tensor) while :attr:`counting` is set. On an accelerator
    each such call waits for the device to finish its queued work; on the CPU nothing waits, but the
    same calls would, so counting them on the CPU tests the loop's code (``nonzero`` too: its output's
    size is read back). Reads made by the host-side data layer (``distalign/data/``: batches built on
    the host before their copy) are not device reads and are left out, unless the model's forward
    (``distalign/models/``) called it. Each read is filed under its innermost distalign frame, or under the library that
    made it when no distalign frame is on top (``transformers``)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero")

    def __init__(self) -> None:
        import collections

        self.counting = False
        self.where: collections.Counter[str] = collections.Counter()

    def record(self) -> None:
        import traceback
        from pathlib import Path

        import distalign

        package = Path(distalign.__file__).parent
        stack = traceback.extract_stack()[:-2]
        # Called by the model's forward: a models/ frame after the loop's last frame (train/).
        last_loop = max(
            (i for i, f in enumerate(stack) if Path(f.filename).is_relative_to(package / "train")), default=-1
        )
        in_forward = any(Path(f.filename).is_relative_to(package / "models") for f in stack[last_loop + 1 :])
        for frame in reversed(stack):
            path = Path(frame.filename)
            if path.is_relative_to(package):
                if in_forward or not path.is_relative_to(package / "data"):
                    self.where[f"{path.relative_to(package)}:{frame.lineno} ({frame.name})"] += 1
                return
            library = (
                path.parts[path.parts.index("site-packages") + 1] if "site-packages" in path.parts else None
            )
            if library not in (None, "torch"):
                self.where[library] += 1
                return

    @property
    def total(self) -> int:
        return sum(self.where.values())


@pytest.fixture
def device_reads(monkeypatch) -> DeviceReads:
    """A :class:`DeviceReads` counter patched into ``torch.Tensor`` for one test."""
    reads = DeviceReads()
    for name in DeviceReads.METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if reads.counting:
                reads.counting = False  # a read that reads (cpu() -> numpy) counts once
                try:
                    reads.record()
                    return _original(self, *args, **kwargs)
                finally:
                    reads.counting = True
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
