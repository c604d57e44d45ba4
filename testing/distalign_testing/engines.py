"""A generation engine on the CPU with the interface of the vLLM one (``models.vllm_engine``): for the
tests of the vLLM sampler and for checking a GPU script's logic on a machine without vLLM."""

from __future__ import annotations

import copy

import torch

from distalign.models.loading import is_peft_model, unwrap_model
from distalign.models.sampling import sample_completions
from distalign.models.vllm_engine import EngineSample


class CpuEngine:
    """A plain copy of a model's architecture, started with random weights (as vLLM's dummy load),
    whose weights are replaced by name on ``load_weights`` (an unknown name is an error, as in vLLM),
    drawing exact seeded ancestral samples, with their log-probs, from whatever it holds.

    ``pushed_names``: the names each push set; ``pushes_at_draw``: the number of pushes before each
    ``generate`` call.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, seed: int = 0) -> None:
        plain = unwrap_model(model)
        if is_peft_model(plain):
            plain = plain.get_base_model()
        self.model = type(plain)(copy.deepcopy(plain.config)).eval().requires_grad_(False)
        self.model.generation_config = copy.deepcopy(plain.generation_config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.model.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        self.tokenizer = tokenizer
        self.pushed_names: list[set[str]] = []
        self.pushes_at_draw: list[int] = []

    def load_weights(self, weights) -> None:
        params = dict(self.model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise ValueError(f"There is no module or parameter named {name!r}")
                params[name].copy_(tensor)
                loaded.add(name)
        self.pushed_names.append(loaded)

    def generate(self, requests, *, max_new_tokens, stop_token_ids):
        self.pushes_at_draw.append(len(self.pushed_names))
        outputs = []
        for request in requests:
            drawn = sample_completions(
                self.model,
                self.tokenizer,
                [""],
                prompt_ids=[request.prompt_ids],
                num_samples=request.num_samples,
                max_new_tokens=max_new_tokens,
                eos_token_ids=stop_token_ids,
                generator=torch.Generator().manual_seed(request.seed),
            )
            outputs.append(
                [EngineSample(ids, float(lp)) for ids, lp in zip(drawn.completion_ids, drawn.logprobs)]
            )
        return outputs
