"""``train.compile``: regional compilation of a causal LM's decoder layers with ``torch.compile``.

Each decoder layer's forward is compiled in place (``nn.Module.compile``). The layers share their code,
so dynamo compiles it once and every layer reuses the graph, which keeps the compile short where
compiling the whole model would trace every layer. The output head (the fused log-prob head, a
hand-written autograd function) and the losses stay eager. The attention of packed batches (span
attention, FlexAttention) is excluded from the traced graph in ``span_attention``: its spans differ
with every micro-batch and would force a recompile each time.
"""

from __future__ import annotations

from torch import nn

from distalign.models.token_logprobs import causal_lm_of


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` (a transformers causal LM, peft-wrapped or not) in
    place; returns how many. Raises ``ValueError`` for a model without a ``layers`` list in its decoder,
    naming its type."""
    causal_lm = causal_lm_of(model)
    get_decoder = getattr(causal_lm, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"train.compile: {type(causal_lm).__name__} has no list of decoder layers to compile "
            "(get_decoder().layers); set train.compile=false"
        )
    for layer in layers:
        layer.compile()
    return len(layers)
