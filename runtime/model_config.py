"""Per-model serving config: `config.toml` next to a model's version folders.

    version_policy = { latest = 2 }      # or { all = true } or { specific = ["1", "3"] }
    instances = 1                        # sessions per version (default: the device profile's)

    [batching]                           # the MicroBatcher knobs
    max_batch_size = 64                  # 0: no batch axis, requests never stacked
    max_queue_delay_us = 500
    preferred_batch_sizes = [32, 64]
    max_queue_size = 1024

    [traffic]
    weights = { "1" = 90, "2" = 10 }     # canary split for requests that name no version
    sticky_key = "x-user-id"             # same key value -> same version (hash of the value)
    shadow = "2"                         # a copy of each request; compared, counted, never returned
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun.runtime.batcher import MAX_QUEUE_DELAY_US, BatchingConfig
from edgerun.devices.profile import is_integer, key_text
from edgerun.runtime.bundle import VERSION_RE, version_key
from edgerun.runtime.errors import BundleError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "config.toml"



def finite_number(value: Any) -> bool:
    """A number as TOML or JSON gives it, neither a bool (True is an int to Python) nor NaN
    nor infinite: what every setting in seconds, share or weight must be. An integer past
    any float (TOML and JSON take 10**400) is none: it raised OverflowError, a traceback."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False

@dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk are served: the latest N, all, or a specific list."""

    latest: int = 1
    specific: tuple[str, ...] = ()
    all: bool = False

    def select(self, available: list[str]) -> list[str]:
        ordered = sorted(available, key=version_key)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest:]


@dataclass(frozen=True)
class TrafficPolicy:
    """How requests that name no version are spread over the served versions."""

    weights: dict[str, float] = field(default_factory=dict)
    sticky_key: str | None = None
    shadow: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    instances: int | None = None
    traffic: TrafficPolicy = field(default_factory=TrafficPolicy)

    @classmethod
    def load(cls, model_dir: Path, defaults: BatchingConfig | None = None) -> ModelConfig:
        """The model's config.toml, or the defaults when it has none."""
        path = model_dir / CONFIG_FILE
        batching_defaults = defaults or BatchingConfig()
        if not path.is_file():
            return cls(batching=batching_defaults)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
            return cls._from_dict(data, batching_defaults)
        except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: {exc}") from exc
        except RecursionError:  # tomllib parses arrays and tables recursively
            raise BundleError(f"{path}: arrays or tables nested too deep") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any], defaults: BatchingConfig) -> ModelConfig:
        _only(data, {"version_policy", "batching", "instances", "traffic"}, "")
        policy = data.get("version_policy", {})
        _only(policy, {"latest", "specific", "all"}, "version_policy.")
        if len(policy) > 1:
            raise ValueError("version_policy takes one of latest, specific or all")
        latest, specific, every = (policy.get("latest", 1), policy.get("specific", []),
                                   policy.get("all", False))
        if not is_integer(latest):
            raise ValueError(f"version_policy.latest must be an integer, got {latest!r}")
        if not isinstance(specific, list):  # "12" would serve versions 1 and 2
            raise ValueError(f"version_policy.specific must be a list, got {specific!r}")
        if "specific" in policy and not specific:  # it served the newest version
            raise ValueError("version_policy.specific must name at least one version")
        if not all(isinstance(v, str) or is_integer(v) for v in specific):
            raise ValueError(f"version_policy.specific must name versions, got {specific!r}")
        if not isinstance(every, bool):  # "false" would serve every version
            raise ValueError(f"version_policy.all must be true or false, got {every!r}")
        version_policy = VersionPolicy(latest=latest, specific=tuple(str(v) for v in specific),
                                       all=every)
        if version_policy.latest < 1:
            raise ValueError("version_policy.latest must be >= 1")
        batching = data.get("batching", {})
        _only(batching, {"max_batch_size", "max_queue_delay_us", "preferred_batch_sizes",
                         "max_queue_size"}, "batching.")
        for key, value in batching.items():  # a NaN delay left requests waiting forever
            check, wanted = _BATCHING_TYPES[key]
            if not check(value):
                raise ValueError(f"batching.{key} must be {wanted}, got {value!r}")
        merged = {**defaults.__dict__, **batching}
        merged["preferred_batch_sizes"] = tuple(merged["preferred_batch_sizes"])
        traffic = data.get("traffic", {})
        _only(traffic, {"weights", "sticky_key", "shadow"}, "traffic.")
        weights = traffic.get("weights", {})
        if not isinstance(weights, dict):
            raise ValueError(f"traffic.weights must be a table, got {weights!r}")
        shadow = traffic.get("shadow")
        if shadow is not None and not (isinstance(shadow, str) or is_integer(shadow)):
            raise ValueError(f"traffic.shadow must be a version, like \"2\", got {shadow!r}")
        sticky_key = traffic.get("sticky_key")
        if sticky_key is not None and not isinstance(sticky_key, str):
            raise ValueError(f"traffic.sticky_key must be a string, got {sticky_key!r}")
        if not all(finite_number(w) and w >= 0 for w in weights.values()):
            raise ValueError(f"traffic.weights must be finite numbers >= 0, got {weights!r}")
        weights = {str(v): float(w) for v, w in weights.items()}
        named = [("version_policy.specific", v) for v in version_policy.specific] + \
            [("traffic.weights", v) for v in weights] + \
            ([("traffic.shadow", str(shadow))] if shadow is not None else [])
        for key, version in named:  # "v2" or "01" never names a version folder: never served
            if not VERSION_RE.fullmatch(version):
                raise ValueError(f"{key} names {version!r}, which is not a version (an "
                                 "integer like 2, or semver like 1.2.0)")
        instances = data.get("instances")
        if instances is not None and not is_integer(instances):
            raise ValueError(f"instances must be an integer, got {instances!r}")
        if instances is not None and instances < 1:
            raise ValueError("instances must be >= 1")
        return cls(
            version_policy=version_policy, batching=BatchingConfig(**merged),
            instances=None if instances is None else int(instances),
            traffic=TrafficPolicy(weights=weights, sticky_key=sticky_key,
                                  shadow=None if shadow is None else str(shadow)))


#: What each batching knob takes; BatchingConfig compares them, so NaN and 2.5 passed it.
_BATCHING_TYPES = {
    "max_batch_size": (is_integer, "an integer"),
    "max_queue_size": (is_integer, "an integer"),
    "max_queue_delay_us": (lambda v: finite_number(v) and 0 <= v <= MAX_QUEUE_DELAY_US,
                           f"a finite number from 0 to {MAX_QUEUE_DELAY_US} (a minute)"),
    "preferred_batch_sizes": (lambda v: isinstance(v, list) and all(map(is_integer, v)),
                              "a list of integers"),
}


def _only(data: dict[str, Any], allowed: set[str], prefix: str) -> None:
    if not isinstance(data, dict):  # `batching = 5` was "'int' object is not iterable"
        raise ValueError(f"{prefix.rstrip('.')} must be a table, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown key {', '.join(prefix + key_text(k) for k in unknown)}; "
                         f"allowed: {', '.join(sorted(prefix + k for k in allowed))}")
