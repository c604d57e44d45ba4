"""gradients_close, the comparison every exactness test relies on: relative per parameter, so an error
confined to a parameter with small gradients is caught, where a tolerance scaled by the largest entry of
the whole gradient (the rule it replaced: max |a - b| <= tol x max(1, max |b|)) let it through."""

from __future__ import annotations

import torch
from distalign_testing.runs import gradients_close, largest_gradient, unwrapped_name


def _gradient() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "lm_head.weight": torch.randn(64, generator=generator, dtype=torch.float64),
        "model.norm.weight": 1e-4 * torch.randn(16, generator=generator, dtype=torch.float64),
    }


def test_an_error_in_a_small_gradient_parameter_is_caught():
    exact = _gradient()
    wrong = {name: grad.clone() for name, grad in exact.items()}
    wrong["model.norm.weight"][3] += 5e-7  # a 1e-2 relative error in the small parameter
    old_rule = float(max((wrong[k] - exact[k]).abs().max() for k in exact)) <= 1e-6 * max(
        1.0, largest_gradient(exact)
    )
    assert old_rule  # what the whole-vector tolerance accepted
    assert not gradients_close(wrong, exact)


def test_equal_within_round_off_passes_and_zero_must_stay_zero():
    exact = _gradient()
    close = {name: grad * (1 + 1e-9) for name, grad in exact.items()}
    assert gradients_close(close, exact)
    exact["model.norm.weight"][:] = 0
    nonzero = {name: grad.clone() for name, grad in exact.items()}
    nonzero["model.norm.weight"][0] = 1e-30
    assert gradients_close({k: v.clone() for k, v in exact.items()}, exact)
    assert not gradients_close(nonzero, exact)


def test_wrapped_parameter_names_line_up():
    assert unwrapped_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert (
        unwrapped_name("_fsdp_wrapped_module.model._checkpoint_wrapped_module.layers.0.weight")
        == "model.layers.0.weight"
    )
