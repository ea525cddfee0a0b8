"""Fixtures: bundles of small real ONNX models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, Model, create_bundle

# The property tests run the examples a seed fixed per test gives, so a run of the suite (CI's
# too) fails for a change, not for a rare case a random search happened on that time, and a
# failure reproduces. HYPOTHESIS_PROFILE=explore searches afresh, with a random seed.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Bundle]:
    """Write ONNX bytes to a file and bundle them; returns the opened Bundle."""
    counter = iter(range(1_000_000))

    def make(onnx_bytes: bytes, name: str = "m", version: str = "1", **kwargs) -> Bundle:
        n = next(counter)
        source = tmp_path / f"src{n}.onnx"
        source.write_bytes(onnx_bytes)
        return create_bundle(source, tmp_path / f"bundle{n}", name=name, version=version,
                             **kwargs)

    return make


@pytest.fixture
def mlp_bundle(make_bundle) -> Bundle:
    return make_bundle(mlp_onnx([8, 16, 4]), name="mlp")


@pytest.fixture
def mlp_model(mlp_bundle) -> Model:
    model = Model.load(mlp_bundle.path, intra_op_threads=1)
    yield model
    model.close()
