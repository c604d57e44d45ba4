"""Designer and gold rewards behind one batched, cached interface.

``build_reward(spec)`` returns a :class:`RewardFn`: ``reward(prompts, completions) -> Tensor [N]``
(float32, higher is better). Built-ins (``REWARDS.names()``): ``vader_sentiment``,
``readability_flesch``, ``readability_grade``, ``length``, ``keyword``, ``regex``, ``hf_classifier``,
``callable``. Add one with ``@REWARDS.register("name")`` on a factory taking keyword-only settings and
returning a batched scorer.
"""

from distalign.rewards import builtin, classifier  # noqa: F401  (registers the built-in rewards)
from distalign.rewards.base import REWARDS, Normalization, RewardFn, Scorer
from distalign.rewards.build import build_reward, shared_cache
from distalign.rewards.cache import RewardCache, text_key

__all__ = [
    "REWARDS",
    "Normalization",
    "RewardCache",
    "RewardFn",
    "Scorer",
    "build_reward",
    "shared_cache",
    "text_key",
]
