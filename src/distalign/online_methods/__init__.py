"""Online methods: what turns one step's samples into the per-sample reward R the REINFORCE surrogate
ascends. One module per method, each registering an :class:`OnlineMethodSpec` in
:data:`ONLINE_METHODS`, as losses register in ``LOSSES``. The online loop
(``distalign.train.online``) and the config look a method up by ``online.method`` and ask the spec,
never the name, what to build: a target or a reward, which options to pass, which baselines fit.

Adding a method: one module here (a pure function of the step's samples plus a registration), one
test, one row in docs/fdpg.md."""

from distalign.online_methods import fdpg, reinforce, rloo  # noqa: F401  (each registers itself)
from distalign.online_methods.base import ONLINE_METHODS, OnlineMethodSpec, StepSamples, get_online_method

__all__ = ["ONLINE_METHODS", "OnlineMethodSpec", "StepSamples", "get_online_method"]
