"""The online loop (sample -> score -> signal -> step) and its parts: ``loop.py`` the loop itself,
``setup.py`` what a run builds once and the loop state, ``signal.py`` the step's signal (the method's
reward from ``distalign.online_methods``, baseline, importance weights), ``update.py`` the surrogate's
backward, ``samplers.py`` what draws the samples, ``evaluation.py`` evaluation during training."""

from distalign.train.online.loop import train_online

__all__ = ["train_online"]
