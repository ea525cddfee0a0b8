"""The traffic router: which served version answers a request, and who gets a shadow copy.

A request that names a version gets that version. One that names none is spread by the model's
traffic policy: canary weights, drawn at random, or by a stable hash of a sticky key (the same
key lands on the same version on every replica). A shadow version gets a copy of each answered
request through a batcher callback, so shadowing needs no event loop: it works the same from
threads (MQTT callbacks, Lambda handlers) and from asyncio. Shadow answers are compared with the
primary's and counted, never returned.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgerun.runtime.bundle import version_key
from edgerun.runtime.errors import EdgerunError, Overloaded
from edgerun.runtime.metrics import Family
from edgerun.runtime.model_config import ModelConfig
from edgerun.runtime.serving import ServedVersion
from edgerun.runtime.signature import Signature

Outputs = dict[str, np.ndarray]
#: Looks up a request attribute by lower-case name: an HTTP header, an MQTT user property, gRPC
#: metadata. The sticky traffic policy names the attribute whose value pins a caller.
Attributes = Callable[[str], "str | None"]


class ServedModel:
    """A routing-table entry: the ready versions of one model and how traffic reaches them."""

    def __init__(self, name: str, config: ModelConfig,
                 versions: dict[str, ServedVersion]) -> None:
        self.name = name
        self.config = config
        self.versions = versions
        self.latest = max(versions, key=version_key)
        self._weighted = [(v, w) for v, w in sorted(config.traffic.weights.items())
                          if v in versions and w > 0]
        self._total = sum(w for _, w in self._weighted)
        # with no weighted version loaded, a version weighted 0 still gets nothing if any
        # other can answer (`weights = { "2" = 0 }` sent every request to the latest, 2)
        dark = {v for v, w in config.traffic.weights.items() if w <= 0}
        self._fallback = versions[max((v for v in versions if v not in dark),
                                      key=version_key, default=self.latest)]
        # the version that stands for the model when a caller names none (its metadata, its
        # readiness): where unnamed requests go, or most of them under a split (ties to the
        # newest); the newest version described the model even when a split sent it 10 %
        top = max((w for _, w in self._weighted), default=0.0)
        self.primary = versions[max((v for v, w in self._weighted if w == top),
                                    key=version_key)] if self._weighted else self._fallback
        # sticky keys by weighted rendezvous hashing: each version's score for a key depends
        # on that version alone, so adding or removing one moves only the keys it gains or
        # loses (the cumulative split moved keys between two versions that both stayed)
        self._seeds = [(versions[v], hashlib.blake2b(f"{name}\0{v}\0".encode(), digest_size=8),
                        1 / w) for v, w in self._weighted]
        self._stuck: dict[str, ServedVersion] = {}  # keys seen, so a repeat costs no hashing
        shadow = config.traffic.shadow
        self.shadow = versions.get(shadow) if shadow is not None else None

    def pick(self, attributes: Attributes | None) -> ServedVersion:
        """The version for a request that names none: canary weights, sticky by key hash."""
        if not self._weighted:
            return self._fallback
        sticky = self.config.traffic.sticky_key
        key = attributes(sticky.lower()) if sticky and attributes is not None else None
        if key:  # an empty value is no key: pinned, every such caller went to one version
            served = self._stuck.get(key)
            return served if served is not None else self._stick(key)
        point = random.random() * self._total
        for version, weight in self._weighted:
            point -= weight
            if point < 0:
                return self.versions[version]
        return self.versions[self._weighted[-1][0]]

    def _stick(self, key: str) -> ServedVersion:
        """The version with the lowest -ln(hash(version, key)) / weight: P = weight / total."""
        data, log, from_bytes = key.encode(), math.log, int.from_bytes
        best, low = self._seeds[0][0], math.inf
        for served, seed, inverse in self._seeds:
            digest = seed.copy()
            digest.update(data)
            score = (_LN_2_64 - log(from_bytes(digest.digest(), "big") + 0.5)) * inverse
            if score < low:
                best, low = served, score
        if len(self._stuck) < _STUCK_KEYS and len(key) <= _STUCK_KEY_CHARS:
            self._stuck[key] = best
        return best


#: Sticky keys remembered per routing-table entry (a new table starts afresh), and the longest.
_STUCK_KEYS, _STUCK_KEY_CHARS = 4096, 128
_LN_2_64 = 64 * math.log(2)


class Routed:
    """A request's place in the repository: the version it runs on (held until `release`)."""

    __slots__ = ("served", "_shadow", "_shadow_total")

    def __init__(self, served: ServedVersion, shadow: ServedVersion | None,
                 shadow_total: Family) -> None:
        self.served = served
        self._shadow = shadow
        self._shadow_total = shadow_total

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def signature(self) -> Signature:
        return self.served.signature

    def run(self, inputs: Mapping[str, Any], timeout: float | None = None) -> Outputs:
        """Run on a thread (blocks until answered); then send the shadow copy."""
        outputs = self.served.batcher.predict(inputs, timeout=timeout)
        self._send_shadow(inputs, outputs)
        return outputs

    async def run_async(self, inputs: Mapping[str, Any],
                        timeout: float | None = None) -> Outputs:
        """Run from an event loop; then send the shadow copy."""
        outputs = await self.served.batcher.predict_async(inputs, timeout=timeout)
        self._send_shadow(inputs, outputs)
        return outputs

    def release(self) -> None:
        """The request is answered: the version may drain. A shadow not sent is let go too."""
        self.served.release()
        if self._shadow is not None:
            self._shadow.release()
            self._shadow = None

    def __enter__(self) -> Routed:
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        if isinstance(error, EdgerunError) and error.version is None:
            error.version = self.served.version  # whatever failed, this version took it
        self.release()

    def _send_shadow(self, inputs: Mapping[str, Any], primary: Outputs) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is None:
            return

        def count(outcome: str) -> None:
            shadow.release()
            self._shadow_total.labels(self.served.name, self.served.version, shadow.version,
                                      outcome).inc()

        def compared(outputs: Outputs | None, error: BaseException | None) -> None:
            count("error" if outputs is None else
                  "match" if same_outputs(primary, outputs) else "mismatch")

        batcher = shadow.batcher
        if (batcher.queue_depth + 1) * 2 > batcher.config.max_queue_size:
            # copies may take at most half the queue: the shadow version may serve requests
            # of its own, and a queue filled with copies answered those with Overloaded
            count("dropped")
            return
        try:
            batcher.submit_callback(inputs, compared)
        except Overloaded:
            count("dropped")
        except EdgerunError:
            count("error")


def same_outputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" and y.dtype.kind in "fc":
            if not np.allclose(x, y, rtol=1e-3, atol=1e-5, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True
