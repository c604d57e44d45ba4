"""The weights of a (possibly LoRA) model under the names of the plain transformers model, for pushing
into a generation engine (vLLM) that holds a plain copy of the architecture.

With LoRA, each adapted weight is sent as W + delta (peft's ``get_delta_weight``: B A x scale), computed
out of place: merging into the model and unmerging afterwards would leave W + BA - BA, which differs
from W in the last bits, and W is the base a of the f-DPG target (adapters off). Tensors are produced
one at a time, so a push never holds a second full copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from distalign.models.loading import is_peft_model, unwrap_model
from distalign.models.saved import plain_state_key


@torch.no_grad()
def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of ``model`` as the plain transformers model names it.

    ``model``: a transformers model or a peft model of one (DDP / distalign wrappers are stripped).
    Adapter matrices are folded into the weights they adapt (active adapters only; none when adapters
    are disabled or already merged); peft ``modules_to_save`` copies replace their originals. A weight
    tied to another (lm_head to the embeddings) is sent once, under its first name: engines tie it
    themselves. Buffers are not sent (rotary frequencies and masks are derived from the config).
    """
    model = unwrap_model(model)
    if not is_peft_model(model):
        yield from ((name, param.detach()) for name, param in model.named_parameters())
        return
    base = model.get_base_model()
    deltas = _lora_deltas(base)
    for name, param in base.named_parameters():
        plain = plain_state_key(name)
        if plain is None:  # an adapter matrix, or the original of a modules_to_save copy
            continue
        layer = deltas.get(name)
        if layer is None:
            yield plain, param.detach()
        else:
            yield plain, _merged(param, layer)


def _lora_deltas(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Parameter name of each adapted base weight -> its LoRA layer, for layers whose adapters are on."""
    from peft.tuners.lora import LoraLayer

    adapted = {}
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        prefix = f"{module_name}." if module_name else ""
        adapted[f"{prefix}base_layer.weight"] = module
    return adapted


def _merged(weight: torch.Tensor, layer) -> torch.Tensor:
    """W + the sum of the active adapters' deltas, in float32 and cast back to W's dtype (what peft's
    own merge computes)."""
    merged = weight.detach().float().clone()
    for adapter in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(adapter, False):
            # DoRA rescales each column by a norm of the merged weight: not W + delta.
            raise ValueError(f"adapter {adapter!r} uses DoRA, whose merged weight is not W + delta")
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            merged += layer.get_delta_weight(adapter).float()
    return merged.to(weight.dtype)
