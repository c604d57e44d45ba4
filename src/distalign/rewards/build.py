"""``build_reward``: a reward spec (a name, a "pkg.mod:fn" path, or a dict) to a :class:`RewardFn`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from distalign.rewards.base import REWARDS, Normalization, RewardFn
from distalign.rewards.cache import RewardCache

#: Spec keys that configure the wrapper rather than the factory.
WRAPPER_KEYS = ("name", "alias", "direction", "normalize", "cache", "cache_dir")

_SHARED_CACHES: dict[str | None, RewardCache] = {}


def shared_cache(cache_dir: str | Path | None = None) -> RewardCache:
    """One cache per directory (``None``: memory only) for the process, shared by every reward built."""
    key = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
    if key not in _SHARED_CACHES:
        _SHARED_CACHES[key] = RewardCache(key)
    return _SHARED_CACHES[key]


def _normalization(spec: Any) -> Normalization:
    if spec is None or isinstance(spec, Normalization):
        return spec or Normalization()
    if isinstance(spec, str):
        return Normalization(kind=spec)  # type: ignore[arg-type]
    if isinstance(spec, dict):
        allowed = {"kind", "mean", "std", "low", "high", "clip"}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"normalize has unknown keys {sorted(unknown)}; valid keys: {sorted(allowed)}")
        return Normalization(**spec)
    raise ValueError(f"normalize={spec!r} must be 'none', 'zscore', 'minmax' or a mapping with 'kind'")


def resolve_settings(name: str, factory: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` checked against the factory's keyword-only parameters, with defaults filled in."""
    params = {
        p.name: p
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(settings) - set(params))
    if unknown:
        valid = ", ".join(sorted(params)) or "(none)"
        raise ValueError(f"reward {name!r} has no setting(s) {unknown}; its settings: {valid}")
    missing = sorted(
        k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in settings
    )
    if missing:
        raise ValueError(f"reward {name!r} needs setting(s) {missing}")
    resolved = {k: settings.get(k, p.default) for k, p in params.items()}
    try:  # the fingerprint hashes the settings as JSON, so they must survive a round trip
        return json.loads(json.dumps(resolved))
    except TypeError as err:
        raise ValueError(
            f"reward {name!r}: settings must be plain data (numbers, strings, lists, maps): {err}"
        ) from None


def build_reward(spec: dict[str, Any] | str, *, cache_dir: str | Path | None = None) -> RewardFn:
    """Build a reward from a spec.

    ``spec`` is a registered name (``"vader_sentiment"``), a callable path (``"mypkg.rewards:score"``,
    shorthand for ``{"name": "callable", "path": ...}``) or a dict::

        {"name": "length", "target": 20,            # registry name + the factory's settings
         "alias": "brevity",                        # optional display name
         "direction": "maximize" | "minimize",      # minimize negates the raw score
         "normalize": "none" | "zscore" | "minmax" | {"kind": ..., "mean": ..., "std": ..., "low": ...,
                                                      "high": ..., "clip": false},
         "cache": true, "cache_dir": "path"}         # cache raw scores (memory, + SQLite under cache_dir)

    Unknown reward names raise ``UnknownNameError`` listing the valid ones; unknown or missing settings
    raise ``ValueError`` listing the factory's settings. ``cache_dir`` here is used when the spec gives none.
    """
    if isinstance(spec, str):
        spec = {"name": "callable", "path": spec} if ":" in spec else {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"reward spec {spec!r} must be a name or a mapping with a 'name' key")
    spec = dict(spec)
    name = spec["name"]
    factory = REWARDS.get(name)
    settings = resolve_settings(name, factory, {k: v for k, v in spec.items() if k not in WRAPPER_KEYS})
    scorer = factory(**settings)
    use_cache = spec.get("cache", True)
    cache = shared_cache(spec.get("cache_dir", cache_dir)) if use_cache else None
    return RewardFn(
        name,
        scorer,
        settings=settings,
        direction=spec.get("direction", "maximize"),
        normalization=_normalization(spec.get("normalize")),
        cache=cache,
        alias=spec.get("alias"),
    )
