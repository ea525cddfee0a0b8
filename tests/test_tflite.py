"""The TFLite backend on real LiteRT models: signature, batch resize, int8 io, threads, batcher."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edgerun.runtime import InvalidInput, MicroBatcher, Model, create_bundle
from edgerun.runtime.metrics import Registry
from tests.cli import edgerun
from tests.tflite_models import IN_Q, OUT_Q, int8_dense_tflite

MODELS = Path(__file__).parents[2] / "shared" / "models"
SELFIE = MODELS / "selfie_segmentation.tflite"
HAND = MODELS / "hand_recrop.tflite"


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 256, 256, 3), dtype=np.float32)


def bare(path: Path, x: np.ndarray) -> np.ndarray:
    """One row at a time through a plain LiteRT interpreter: the reference."""
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    rows = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]))
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def selfie(tmp_path_factory) -> Model:
    folder = tmp_path_factory.mktemp("selfie") / "bundle"
    create_bundle(SELFIE, folder, name="selfie", version="1")
    model = Model.load(folder, intra_op_threads=2, instances=2)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> Model:
    folder = tmp_path_factory.mktemp("hand") / "bundle"
    create_bundle(HAND, folder, name="hand", version="1")
    model = Model.load(folder, intra_op_threads=1)
    yield model
    model.close()


def test_cli_bundles_a_tflite_model_that_verifies_and_predicts(tmp_path):
    made = edgerun("bundle", "create", str(SELFIE), "--name", "selfie", "--version", "2",
                   "-o", str(tmp_path / "selfie.tar.gz"))
    assert made.returncode == 0, made.stderr
    manifest = json.loads(edgerun("bundle", "inspect", str(tmp_path / "selfie.tar.gz"),
                                  "--json").stdout)
    assert manifest["backend"] == "tflite" and manifest["model_file"] == "model.tflite"
    assert manifest["inputs"] == [{"name": "input_1", "dtype": "float32",
                                   "shape": [-1, 256, 256, 3], "batch_axis": 0}]
    assert manifest["outputs"][0]["shape"] == [-1, 256, 256, 1]
    checked = edgerun("bundle", "verify", str(tmp_path / "selfie.tar.gz"))
    assert checked.returncode == 0, checked.stderr
    assert "golden: output matches the build's on tflite" in checked.stdout
    np.save(tmp_path / "x.npy", images(1))
    predicted = edgerun("predict", str(tmp_path / "selfie.tar.gz"), "-i", str(tmp_path / "x.npy"))
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["outputs"]["activation_10"]["shape"] == [1, 256, 256, 1]


def test_batch_resize_gives_the_rows_of_single_runs(selfie):
    x = images(3)
    out = selfie.predict({"input_1": x})["activation_10"]
    assert out.shape == (3, 256, 256, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out, bare(SELFIE, x), rtol=1e-4, atol=1e-5)
    # back to batch 1 after a larger batch: the interpreter is resized again
    np.testing.assert_allclose(selfie.predict({"input_1": x[:1]})["activation_10"],
                               out[:1], rtol=1e-4, atol=1e-5)


def test_a_model_that_cannot_batch_keeps_its_fixed_shape_with_a_clear_error(hand):
    # hand_recrop resizes without complaint but its second row comes out wrong, so the backend
    # declares its batch fixed at 1
    assert hand.signature.inputs[0].shape == (1, 256, 256, 3)
    assert not hand.signature.batchable
    x = images(2)
    with pytest.raises(InvalidInput, match=r"input 'input_1': dim 0 must be 1"):
        hand.predict({"input_1": x})
    got = hand.predict({"input_1": x[:1]})["output_crop"]
    assert got.shape == (1, 1, 1, 4)
    np.testing.assert_allclose(got, bare(HAND, x[:1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["selfie", "hand"])
def test_golden_sample_reproduces(which, request):
    request.getfixturevalue(which).check_golden()


def test_int8_model_takes_and_gives_float(tmp_path):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((3, 4)) * 0.5).astype(np.float32)
    bias = (rng.standard_normal(3) * 0.2).astype(np.float32)
    source = tmp_path / "dense.tflite"
    source.write_bytes(int8_dense_tflite(weight, bias))
    raw = Interpreter(model_path=str(source))
    assert raw.get_input_details()[0]["dtype"] == np.int8  # the tensors really are int8
    bundle = create_bundle(source, tmp_path / "b", name="dense", version="1")
    assert [s.dtype for s in (*bundle.signature.inputs, *bundle.signature.outputs)] == \
        ["float32", "float32"]
    model = Model.load(bundle)
    x = rng.uniform(-2, 2, (7, 4)).astype(np.float32)
    y = model.predict({"x": x})["y"]
    assert y.shape == (7, 3) and y.dtype == np.float32
    # error bound: output rounding plus input rounding through the weights
    bound = OUT_Q[0] / 2 + IN_Q[0] / 2 * np.abs(weight).sum(axis=1).max() + 0.02
    np.testing.assert_allclose(y, x @ weight.T + bias, atol=bound)
    assert np.abs(y - (x @ weight.T + bias)).max() > 0  # quantized, not float, arithmetic
    model.check_golden()



def test_nan_into_an_int8_model_is_refused_and_its_neighbours_still_run(tmp_path):
    # NaN cast to int8 became an arbitrary integer: a finite, plausible answer for an input
    # nobody sent
    weight = np.eye(3, 4, dtype=np.float32)
    bias = np.zeros(3, np.float32)
    source = tmp_path / "dense.tflite"
    source.write_bytes(int8_dense_tflite(weight, bias))
    model = Model.load(create_bundle(source, tmp_path / "b", name="dense", version="1"))
    bad = np.array([[0.5, np.nan, 0.0, 0.0]], np.float32)
    with pytest.raises(InvalidInput, match="input 'x': NaN cannot be quantized") as caught:
        model.predict({"x": bad})
    assert caught.value.tensor == "x"
    good = np.array([[0.5, 1.0, -1.0, 0.0]], np.float32)
    with MicroBatcher(model, registry=Registry(), max_queue_delay_us=20_000) as batcher:
        first = batcher.submit({"x": good})
        with pytest.raises(InvalidInput, match="NaN"):
            batcher.submit({"x": bad})
        np.testing.assert_allclose(first.result()["y"], good @ weight.T, atol=0.1)
    saturated = model.predict({"x": np.array([[np.inf, 0, 0, 0]], np.float32)})["y"]
    assert np.isfinite(saturated).all(), "infinities saturate, as any out-of-range value does"
    model.close()


def test_concurrent_runs_never_share_an_interpreter(selfie):
    x = images(8, seed=1)
    expected = bare(SELFIE, x)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: selfie.predict({"input_1": x[i:i + 1]})["activation_10"],
                            range(8)))
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-4, atol=1e-5)


def test_thread_count_comes_from_the_profile(selfie):
    described = selfie.describe()
    assert described["backend"] == "tflite" and described["threads"] == 2
    assert described["interpreter"].startswith("ai-edge-litert")


@pytest.mark.parametrize("which", ["selfie", "hand"])
def test_served_through_the_micro_batcher(which, request):
    model = request.getfixturevalue(which)
    x = images(6, seed=2)
    path = SELFIE if which == "selfie" else HAND
    expected = bare(path, x)
    output = model.signature.outputs[0].name

    async def main() -> list[np.ndarray]:
        with MicroBatcher(model, registry=Registry(), max_batch_size=4,
                          max_queue_delay_us=20_000) as batcher:
            outs = await asyncio.gather(*(batcher.predict_async({"input_1": x[i:i + 1]})
                                          for i in range(6)))
        return [o[output] for o in outs]

    got = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-4, atol=1e-4)
