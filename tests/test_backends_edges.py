"""Edge cases of the TFLite and TVM backends on real models: what a batch, a dtype or a
second caller must not change in anyone's answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgerun.runtime import InvalidInput, MicroBatcher, Model, create_bundle
from edgerun.runtime.metrics import Registry
from tests.tflite_models import (float_add_tflite, float_concat_tflite, float_sum_tflite,
                                  int32_row_mixing_tflite)


def test_an_integer_model_that_mixes_rows_is_not_declared_batchable(tmp_path: Path):
    # the batch trial fed two rows of zeros to integer inputs: identical rows hide a graph that
    # mixes them, so the model was served batched and neighbours changed each other's answers
    source = tmp_path / "mix.tflite"
    source.write_bytes(int32_row_mixing_tflite())
    model = Model.load(create_bundle(source, tmp_path / "b", name="mix", version="1"))
    assert not model.signature.batchable
    assert model.signature.inputs[0].shape == (1, 4)
    rows = [np.array([[1, 2, 3, 4]], np.int32), np.array([[10, 20, 30, 40]], np.int32)]
    with pytest.raises(InvalidInput, match=r"input 'x': dim 0 must be 1"):
        model.predict({"x": np.concatenate(rows)})
    with MicroBatcher(model, registry=Registry(), max_queue_delay_us=50_000) as batcher:
        pending = [batcher.submit({"x": row}) for row in rows]
        for row, answer in zip(rows, pending):
            np.testing.assert_array_equal(answer.result()["y"], 2 * row)
    model.close()


def test_a_request_of_no_rows_gets_empty_outputs_and_the_next_one_its_answer(tmp_path: Path):
    # LiteRT's XNNPACK delegate cannot resize a real graph to a batch of 0: the request was a
    # 500 ("XNNPack delegate failed to reshape runtime"), naming no input
    from tests.test_tflite import SELFIE, bare, images

    create_bundle(SELFIE, tmp_path / "b", name="selfie", version="1")
    model = Model.load(tmp_path / "b", intra_op_threads=1, instances=1)
    x = images(2, seed=5)
    empty = model.predict({"input_1": x[:0]})["activation_10"]
    assert empty.shape == (0, 256, 256, 1) and empty.dtype == np.float32
    np.testing.assert_allclose(model.predict({"input_1": x})["activation_10"], bare(SELFIE, x),
                               rtol=1e-4, atol=1e-5)
    with MicroBatcher(model, registry=Registry()) as batcher:
        assert batcher.predict({"input_1": x[:0]})["activation_10"].shape == (0, 256, 256, 1)
    model.close()


def test_an_empty_sequence_into_a_model_that_does_not_batch_gets_the_models_answer(
        tmp_path: Path):
    # a request of no rows ran one row of zeros and had its outputs cut to no rows, as if axis
    # 0 were a batch: the sum of no elements came back as [] where the model declares and
    # answers [0.]
    source = tmp_path / "sum.tflite"
    source.write_bytes(float_sum_tflite())
    model = Model.load(create_bundle(source, tmp_path / "b", name="sum", version="1"),
                       intra_op_threads=1, instances=1)
    assert not model.signature.batchable
    assert model.signature.outputs[0].shape == (1,)
    np.testing.assert_array_equal(model.predict({"x": [1.0, 2.0, 3.0]})["y"], [6.0])
    np.testing.assert_array_equal(model.predict({"x": []})["y"], [0.0])
    with MicroBatcher(model, registry=Registry(), max_queue_delay_us=20_000) as batcher:
        empty, full = batcher.submit({"x": []}), batcher.submit({"x": [4.0, 5.0]})
        np.testing.assert_array_equal(empty.result()["y"], [0.0])
        np.testing.assert_array_equal(full.result()["y"], [9.0])
    model.close()


def test_a_config_max_batch_size_of_0_runs_an_empty_tflite_input_as_it_is(tmp_path: Path):
    # the config unbatched the signature but not the backend, which still took an input of no
    # rows for a batch of none: concat([], [1, 2]) ran as one row of zeros each and was cut
    # to [], where the model (and a bare interpreter) answers [1, 2]
    from ai_edge_litert.interpreter import Interpreter

    from edgerun.runtime.repository import Repository

    source = tmp_path / "concat.tflite"
    source.write_bytes(float_concat_tflite())
    create_bundle(source, tmp_path / "repo" / "concat" / "1", name="concat", version="1")
    (tmp_path / "repo" / "concat" / "config.toml").write_text(
        "[batching]\nmax_batch_size = 0\n")
    repository = Repository(tmp_path / "repo", registry=Registry())
    repository.load_all()
    served = repository.get("concat")
    assert not served.signature.batchable
    prefix, x = np.array([], np.float32), np.array([1, 2], np.float32)
    bare = Interpreter(model_path=str(source))
    bare.resize_tensor_input(0, [0])
    bare.resize_tensor_input(1, [2])
    bare.allocate_tensors()
    bare.set_tensor(0, prefix)
    bare.set_tensor(1, x)
    bare.invoke()
    np.testing.assert_array_equal(bare.get_tensor(2), [1, 2])
    np.testing.assert_array_equal(
        served.batcher.predict({"prefix": prefix, "x": x})["joined"], [1, 2])
    np.testing.assert_array_equal(
        served.batcher.predict({"prefix": x[:1], "x": x})["joined"], [1, 1, 2])
    repository.close()


def test_shapes_a_tflite_model_cannot_take_are_refused_naming_them_each_time(tmp_path: Path):
    # the interpreter that failed to allocate them went back to the pool: the same request
    # again got "Tensor is unallocated", and LiteRT's error reporter kept every message, so each
    # failure's text (an InferenceError, a 500) carried all the ones before it, without bound
    source = tmp_path / "add.tflite"
    source.write_bytes(float_add_tflite())
    model = Model.load(create_bundle(source, tmp_path / "b", name="add", version="1"),
                       intra_op_threads=1, instances=1)
    x, y = np.ones((1, 3), np.float32), np.ones((1, 4), np.float32)
    messages = []
    for _ in range(3):
        with pytest.raises(InvalidInput, match=r"input shapes 'x' \[1, 3\], 'y' \[1, 4\]: the "
                                               "model cannot run them") as caught:
            model.predict({"x": x, "y": y})
        messages.append(str(caught.value))
    assert messages[0] == messages[1] == messages[2]
    np.testing.assert_array_equal(model.predict({"x": x, "y": 2 * x})["z"], 3 * x)
    with MicroBatcher(model, registry=Registry(), max_queue_delay_us=20_000) as batcher:
        good = batcher.submit({"x": y, "y": y})
        with pytest.raises(InvalidInput, match="cannot run them"):
            batcher.predict({"x": x, "y": y})
        np.testing.assert_array_equal(good.result()["z"], 2 * y)
    model.close()
