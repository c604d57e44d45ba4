"""The training loops run without cuDNN's SDPA kernel on CUDA (per-shape graph builds), and leave the
kernel settings as they found them."""

import pytest
import torch

from distalign.models.attention import without_cudnn_attention
from distalign.train.offline import train_offline
from distalign.train.online import train_online


def _kernels() -> dict[str, bool]:
    backends = torch.backends.cuda
    return {
        "cudnn": backends.cudnn_sdp_enabled(),
        "flash": backends.flash_sdp_enabled(),
        "efficient": backends.mem_efficient_sdp_enabled(),
        "math": backends.math_sdp_enabled(),
    }


def test_cudnn_attention_is_off_inside_and_restored_after(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _kernels()
    assert before["cudnn"]  # torch's default, or this test proves nothing
    inside = without_cudnn_attention(_kernels)()
    assert inside == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert _kernels() == before


def test_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = _kernels()

    @without_cudnn_attention
    def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert _kernels() == before


def test_no_effect_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert without_cudnn_attention(_kernels)() == _kernels()


class _Seen(Exception):
    pass


@pytest.mark.parametrize(
    ("module", "loop", "config_path"),
    [
        ("distalign.train.offline", train_offline, None),
        ("distalign.train.online.loop", train_online, "configs/fdpg_tiny.yaml"),
    ],
)
def test_both_training_loops_run_without_it(monkeypatch, module, loop, config_path):
    """What the loop's engine sees when it is built: cuDNN's kernel off (the loop stops right there)."""
    from pathlib import Path

    from distalign.config import load_config

    repo = Path(__file__).resolve().parents[2]
    config = load_config(repo / config_path if config_path else None, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def engine(_config):
        seen.update(_kernels())
        raise _Seen

    monkeypatch.setattr(f"{module}.Engine", engine)
    with pytest.raises(_Seen):
        loop(config)
    assert seen["cudnn"] is False and seen["flash"] is True
