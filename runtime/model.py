"""A loaded bundle: validates requests against its signature, runs the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgerun.devices import DeviceProfile, load_profile
from edgerun.runtime.backends import Backend, backend_class
from edgerun.runtime.bundle import Bundle
from edgerun.runtime.errors import BundleError, EdgerunError, InferenceError
from edgerun.runtime.signature import Signature


#: Golden check tolerances (rtol, atol); see `Model.golden_tolerance`.
CLOSE_TOLERANCE = (1e-3, 1e-4)
LOOSE_TOLERANCE = (1e-2, 1e-3)


class Model:
    """One bundle loaded on one device. Thread-safe: backends allow concurrent `run` calls."""

    def __init__(self, bundle: Bundle, backend: Backend, device: DeviceProfile) -> None:
        self.bundle = bundle
        self.backend = backend
        self.device = device
        self.signature: Signature = bundle.signature
        self.name = bundle.manifest.name
        self.version = bundle.manifest.version
        self._run = backend.run
        conform = type(backend).conform
        self._conform = None if conform is Backend.conform else backend.conform

    @classmethod
    def load(cls, source: str | Path | Bundle, device: str | Path | DeviceProfile | None = None,
             **overrides: Any) -> Model:
        """Open (and verify) a bundle and load it for a device profile.

        `overrides` replace profile fields: `intra_op_threads`, `graph_optimization_level`,
        `execution_providers`, `allow_spinning`, ...
        """
        bundle = source if isinstance(source, Bundle) else Bundle.open(source)
        profile = load_profile(device).replace(**overrides)
        # from the bytes the manifest verifies, never the path: the folder may have changed
        # since the bundle was opened (and its signature checked)
        backend = backend_class(bundle.manifest.backend).from_bundle(bundle, profile)
        return cls(bundle, backend, profile)

    def unbatch(self) -> None:
        """Serve with no batch axis (a batching config's `max_batch_size = 0`): each request
        runs alone, in the shapes its caller sends, and nothing checks rows across inputs."""
        self.signature = self.signature.unbatched()
        self.backend.unbatch()

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check a request against the signature; raises InvalidInput naming the tensor."""
        arrays = self.signature.validate(inputs)
        return arrays if self._conform is None else self._conform(arrays)

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run already-validated arrays; backend failures become InferenceError."""
        try:
            return self._run(arrays)
        except EdgerunError:
            raise
        except Exception as exc:  # backends raise their own types; callers see one
            raise InferenceError(f"model {self.name!r} version {self.version}: {exc}") from exc

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate, then run one forward pass."""
        return self.run(self.validate(inputs))

    async def predict_async(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`predict` with the forward pass off the event loop."""
        arrays = self.validate(inputs)
        return await asyncio.get_running_loop().run_in_executor(None, self.run, arrays)

    def golden_tolerance(self) -> tuple[float, float]:
        """(rtol, atol) for the golden check: fp32 on a CPU reproduces the build closely; a
        quantized or fp16 model, or other kernels (a GPU provider: TF32, fused or reordered
        sums), differ from the build host's by more, and a smoke test must not fail a sound
        model (after OTA, a failure rolls the update back)."""
        reduced = any(str(tag).startswith("quantize:")
                      for tag in self.bundle.manifest.created.get("optimizations", ()))
        providers = self.backend.describe().get("providers") or ["cpu"]
        accelerated = "cpu" not in str(providers[0]).lower()
        return LOOSE_TOLERANCE if reduced or accelerated else CLOSE_TOLERANCE

    def check_golden(self, rtol: float | None = None, atol: float | None = None) -> None:
        """Run the bundle's golden input; BundleError if the output differs from the build's
        by more than `golden_tolerance` (or the given tolerances)."""
        default_rtol, default_atol = self.golden_tolerance()
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        inputs, expected = self.bundle.golden()
        actual = self.predict(inputs)
        for name, want in expected.items():
            got = actual[name]
            if got.shape != want.shape:
                raise BundleError(f"golden check: output {name!r} has shape {got.shape}, "
                                  f"expected {want.shape}")
            if want.dtype.kind in "fc":
                ok = np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
            else:
                ok = np.array_equal(got, want)
            if not ok:
                worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) \
                    if want.dtype.kind in "biuf" else float("nan")
                raise BundleError(f"golden check: output {name!r} differs from the build's "
                                  f"(max abs difference {worst:g})")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "device": self.device.name,
                **self.backend.describe()}

    def close(self) -> None:
        self.backend.close()
        self.bundle.close()
