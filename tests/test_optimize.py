"""The optimizer: quantization, pruning, the optimize pipeline and its command."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgerun.examples import digits_classifier_onnx, digits_split, mlp_onnx
from edgerun.optimizers import OptimizeError
from edgerun.optimizers.pipeline import OptimizeOptions, optimize
from edgerun.optimizers.prune import prune_structured, prune_unstructured
from edgerun.optimizers.quantize import quantize
from edgerun.runtime import Model
from edgerun.runtime.bundle import sha256_file
from tests.cli import edgerun
from tests.helpers import two_input_onnx
from tests.staging_peer import held_elsewhere


def run(model: onnx.ModelProto | bytes | str, **feed: np.ndarray) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_onnx([16, 256, 256, 8]))
    return path


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- quantization --------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_is_close_and_smaller(mlp, tmp_path, per_channel):
    out = tmp_path / "q.onnx"
    tag = quantize(mlp, out, "int8", per_channel=per_channel)
    assert tag == "quantize:int8-dynamic" + (":per-channel" if per_channel else "")
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    x = rows(32, 16)
    assert relative_error(run(str(out), x=x)[0], run(str(mlp), x=x)[0]) < 0.05
    assert out.stat().st_size < mlp.stat().st_size / 3


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_static_qdq_from_a_folder_of_npy(mlp, tmp_path, per_channel):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(4):
        np.save(calibration / f"{i}.npy", rows(16, 16, seed=i))
    out = tmp_path / "q.onnx"
    tag = quantize(mlp, out, "int8", calibration=calibration, per_channel=per_channel)
    assert tag.startswith("quantize:int8-static-qdq")
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = np.concatenate([np.load(calibration / f"{i}.npy") for i in range(4)])  # in range
    assert relative_error(run(str(out), x=x)[0], run(str(mlp), x=x)[0]) < 0.05


@pytest.mark.parametrize("opset", [9, 11])
def test_int8_static_per_channel_of_an_opset_before_13_loads_and_agrees(tmp_path, opset):
    # per-channel DequantizeLinear takes `axis` from opset 13: ONNX Runtime's quantizer wrote
    # it into the opset-11 model, which ONNX Runtime then refused to load
    model = onnx.load_from_string(mlp_onnx([16, 64, 8]))
    model.opset_import[0].version = opset
    source = tmp_path / "old.onnx"
    onnx.save(model, str(source))
    out = tmp_path / "q.onnx"
    calibration = lambda: [{"x": rows(64, 16, seed=1)}]  # noqa: E731
    assert quantize(source, out, "int8", calibration=calibration, per_channel=True) == \
        "quantize:int8-static-qdq:per-channel"
    x = rows(64, 16, seed=1)
    assert relative_error(run(str(out), x=x)[0], run(str(source), x=x)[0]) < 0.05


def test_int8_static_from_a_callable_and_npz(mlp, tmp_path):
    seen = []

    def feeds():
        for i in range(3):
            seen.append(i)
            yield {"x": rows(8, 16, seed=i)}

    out = tmp_path / "q.onnx"
    quantize(mlp, out, "int8", calibration=feeds)
    assert seen == [0, 1, 2]
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "a.npz", x=rows(8, 16))
    quantize(mlp, tmp_path / "q2.onnx", "int8", calibration=folder)
    x = rows(8, 16, seed=1)
    assert relative_error(run(str(out), x=x)[0], run(str(mlp), x=x)[0]) < 0.05


def test_fp16_keeps_float32_inputs_and_outputs(mlp, tmp_path):
    out = tmp_path / "h.onnx"
    assert quantize(mlp, out, "fp16") == "quantize:fp16"
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {init.data_type for init in model.graph.initializer} == {TensorProto.FLOAT16}
    x = rows(8, 16)
    assert relative_error(run(model, x=x)[0], run(str(mlp), x=x)[0]) < 5e-3


def test_calibration_errors_say_what_is_wrong(mlp, tmp_path):
    with pytest.raises(OptimizeError, match="no such folder"):
        quantize(mlp, tmp_path / "q.onnx", "int8", calibration=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptimizeError, match="no .npy or .npz files"):
        quantize(mlp, tmp_path / "q.onnx", "int8", calibration=tmp_path / "empty")
    with pytest.raises(OptimizeError, match=r"has tensors \['y'\], the model takes \['x'\]"):
        quantize(mlp, tmp_path / "q.onnx", "int8", calibration=lambda: [{"y": rows(2, 16)}])
    with pytest.raises(OptimizeError, match="input 'x'"):
        quantize(mlp, tmp_path / "q.onnx", "int8", calibration=lambda: [{"x": rows(2, 5)}])
    with pytest.raises(OptimizeError, match="apply to int8 only"):
        quantize(mlp, tmp_path / "q.onnx", "fp16", calibration=tmp_path)


def test_unsupported_models_are_refused_with_the_reason(mlp, tmp_path):
    plain = tmp_path / "two.onnx"
    plain.write_bytes(two_input_onnx())
    with pytest.raises(OptimizeError, match=r"nothing to quantize to int8: no .*MatMul node "
                                            r"with float32 weights \(its ops: Add, Cast\)"):
        quantize(plain, tmp_path / "q.onnx", "int8")
    quantized = tmp_path / "q.onnx"
    quantize(mlp, quantized, "int8")
    with pytest.raises(OptimizeError, match="already quantized"):
        quantize(quantized, tmp_path / "qq.onnx", "int8")
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OptimizeError, match="not a readable ONNX model"):
        quantize(garbage, tmp_path / "q.onnx", "fp16")


# --- pruning -------------------------------------------------------------------------------

def test_unstructured_pruning_zeroes_the_smallest_weights(mlp):
    original = onnx.load(str(mlp))
    model = onnx.load(str(mlp))
    report = prune_unstructured(model, 0.6)
    assert abs(report.sparsity - 0.6) < 0.01 and report.tag == "prune:unstructured:0.6"
    for before, after in zip(original.graph.initializer, model.graph.initializer):
        w0, w1 = numpy_helper.to_array(before), numpy_helper.to_array(after)
        if before.name.startswith("w"):
            kept = w1 != 0
            np.testing.assert_array_equal(w1[kept], w0[kept])
            assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
    assert len(gzip.compress(model.SerializeToString())) < \
        0.75 * len(gzip.compress(original.SerializeToString()))
    x = rows(16, 16)
    assert run(model, x=x)[0].shape == (16, 8)


def _kill_units(model: onnx.ModelProto, layer: int, units: list[int]) -> None:
    """Zero units' weights and biases: Relu then gives 0, so removing them changes nothing."""
    inits = {init.name: init for init in model.graph.initializer}
    w, b = numpy_helper.to_array(inits[f"w{layer}"]).copy(), \
        numpy_helper.to_array(inits[f"b{layer}"]).copy()
    w[:, units], b[units] = 0, 0
    inits[f"w{layer}"].CopyFrom(numpy_helper.from_array(w, f"w{layer}"))
    inits[f"b{layer}"].CopyFrom(numpy_helper.from_array(b, f"b{layer}"))


def test_structured_pruning_removes_the_weakest_units_exactly(mlp):
    model = onnx.load(str(mlp))
    _kill_units(model, 0, list(range(0, 256, 2)))
    _kill_units(model, 1, list(range(1, 256, 2)))
    x = rows(16, 16)
    expected = run(model, x=x)[0]
    report = prune_structured(model, 0.5)
    assert report.layers[:2] == ["(Gemm): 256 -> 128", "(Gemm): 256 -> 128"]
    shapes = [list(init.dims) for init in model.graph.initializer]
    assert shapes[:6] == [[16, 128], [128], [128, 128], [128], [128, 8], [8]]
    assert "tensor 'y' is a graph output" in report.skipped[0]
    np.testing.assert_allclose(run(model, x=x)[0], expected, rtol=1e-5, atol=1e-5)
    assert report.params_after < 0.3 * report.params_before


def cnn_onnx(*, global_pool: bool) -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool-Conv-Mul-Relu-[GlobalAveragePool]-Flatten-Gemm on 3x8x8 images."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32),
                                       name)

    var = numpy_helper.from_array((np.abs(rng.standard_normal(8)) + 0.5).astype(np.float32),
                                  "var")
    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("s", 8), w("bb", 8), w("mu", 8), var,
             w("w2", 6, 8, 3, 3), w("b2", 6), w("k", 1, 6, 1, 1),
             w("fc", 6 if global_pool else 6 * 4 * 4, 5), w("fcb", 5)]
    node = helper.make_node
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["n1"], name="bn1"),
             node("Relu", ["n1"], ["r1"]),
             node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             node("Mul", ["c2", "k"], ["m2"]), node("Relu", ["m2"], ["r2"])]
    if global_pool:
        nodes += [node("GlobalAveragePool", ["r2"], ["g"]), node("Flatten", ["g"], ["f"])]
    else:
        nodes.append(node("Flatten", ["r2"], ["f"]))
    nodes.append(node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _set(model: onnx.ModelProto, name: str, change) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    array = numpy_helper.to_array(init).copy()
    change(array)
    init.CopyFrom(numpy_helper.from_array(array, name))


@pytest.mark.parametrize("global_pool", [False, True])
def test_structured_pruning_of_a_cnn_rewrites_bn_mul_flatten_and_the_next_layers(global_pool):
    model = cnn_onnx(global_pool=global_pool)
    dead1, dead2 = [1, 3, 4, 6], [0, 2, 5]  # channels that output exactly 0 after their Relu
    for name in ("w1", "b1", "bb", "mu"):
        _set(model, name, lambda a: a.__setitem__(dead1, 0))
    for name in ("w2", "b2"):
        _set(model, name, lambda a: a.__setitem__(dead2, 0))
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = run(model, x=x)[0]
    report = prune_structured(model, 0.5)
    assert report.layers == ["'conv1' (Conv): 8 -> 4", "'conv2' (Conv): 6 -> 3"]
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    assert dims["w1"] == [4, 3, 3, 3] and dims["var"] == [4] and dims["w2"] == [3, 4, 3, 3]
    assert dims["k"] == [1, 3, 1, 1] and dims["fc"] == [3 if global_pool else 3 * 16, 5]
    np.testing.assert_allclose(run(model, x=x)[0], expected, rtol=1e-5, atol=1e-5)


def test_structured_pruning_refuses_a_graph_it_cannot_rewrite_naming_the_node():
    w = numpy_helper.from_array(np.ones((4, 6), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
         helper.make_node("Softmax", ["h"], ["y"], name="probs")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OptimizeError, match=r"no layer whose channels can be removed: "
                                            r"'dense' \(MatMul\): node 'probs' \(Softmax\)"):
        prune_structured(model, 0.5)
    with pytest.raises(OptimizeError, match="strictly between 0 and 1"):
        prune_structured(model, 1.5)


def test_structured_pruning_leaves_a_layer_whose_output_an_if_body_reads(tmp_path):
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
               (("w0", (4, 8)), ("w1", (8, 8)), ("w2", (8, 3)), ("v", (8, 3)))}
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["r", "v"], ["then_z"])], "then", [],
        [helper.make_tensor_value_info("then_z", TensorProto.FLOAT, ["n", 3])])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["else_z"])], "else", [],
        [helper.make_tensor_value_info("else_z", TensorProto.FLOAT, ["n", 3])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["a"], name="first"),
         helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("MatMul", ["b", "w1"], ["h"], name="second"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="last"),
         helper.make_node("If", ["flag"], ["z"], name="branch", then_branch=then_branch,
                          else_branch=else_branch)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = prune_structured(model, 0.5)
    assert report.layers == ["'first' (MatMul): 8 -> 4"]
    assert "'second' (MatMul): node 'branch' (If): its body reads 'r'" in report.skipped
    x = rows(5, 4)
    for flag in (True, False):  # the pruned model still runs, both branches
        y, z = run(model, x=x, flag=np.array(flag))
        assert y.shape == z.shape == (5, 3)


def test_unstructured_pruning_leaves_a_weight_tied_to_an_embedding_lookup():
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((20, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["e", "ids"], ["h"], name="lookup"),
         helper.make_node("Gemm", ["h", "w"], ["u"], name="dense"),
         helper.make_node("Tanh", ["u"], ["t"]),
         helper.make_node("Gemm", ["t", "e"], ["logits"], name="tied", transB=1)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 20])],
        [numpy_helper.from_array(embedding, "e"),
         numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = prune_unstructured(model, 0.5)
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    np.testing.assert_array_equal(inits["e"], embedding)  # the lookup reads it whole
    assert np.mean(inits["w"] == 0) == 0.5
    assert report.skipped == ["e: also read by node 'lookup' (Gather), which pruning would "
                              "change too"]
    del model.graph.node[1:]  # the embedding alone: nothing of its own to prune
    model.graph.node.append(helper.make_node("Gemm", ["h", "e"], ["logits"], transB=1))
    with pytest.raises(OptimizeError, match=r"nothing to prune: .*e: also read by node "
                                            r"'lookup' \(Gather\)"):
        prune_unstructured(model, 0.5)


# --- the pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits classifier, its held-out split as eval data, and calibration files."""
    folder = tmp_path_factory.mktemp("digits")
    onnx_bytes, test_x, test_y = digits_classifier_onnx()
    (folder / "digits.onnx").write_bytes(onnx_bytes)
    np.savez(folder / "eval.npz", X=test_x, labels=test_y)
    train_x = digits_split()[0]
    (folder / "calibration").mkdir()
    for i in range(4):
        np.save(folder / "calibration" / f"{i}.npy", train_x[i * 100:(i + 1) * 100])
    return folder


PATHS = {
    "int8-dynamic": (OptimizeOptions(quantize="int8"), ["quantize:int8-dynamic"]),
    "int8-static": (OptimizeOptions(quantize="int8", per_channel=True, calibration="CAL"),
                    ["quantize:int8-static-qdq:per-channel"]),
    "fp16": (OptimizeOptions(quantize="fp16"), ["quantize:fp16"]),
    "prune-unstructured": (OptimizeOptions(prune=0.5), ["prune:unstructured:0.5"]),
    "prune-structured-int8": (OptimizeOptions(prune=0.3, structured=True, quantize="int8"),
                              ["prune:structured:0.3", "quantize:int8-dynamic"]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_a_bundle_the_core_serves(digits, tmp_path, path):
    options, tags = PATHS[path]
    if options.calibration == "CAL":
        options = OptimizeOptions(**{**vars(options), "calibration": digits / "calibration"})
    options = OptimizeOptions(**{**vars(options), "eval_data": digits / "eval.npz",
                                 "name": "digits", "version": "4", "latency_seconds": 0.02})
    steps = []
    report = optimize(digits / "digits.onnx", tmp_path / "out", options, steps.append)
    assert steps[0] == "bundling the original" and steps[-1] == \
        "measuring the original and the result"
    assert report.optimizations == tags
    model = Model.load(tmp_path / "out")
    created = model.bundle.manifest.created
    assert created["optimizations"] == tags
    # a trained model that float16 holds keeps nothing float32 (fp16) and names nothing
    assert report.fp16_kept_float32 == {} and "fp16_kept_float32" not in created
    assert created["source_sha256"] == sha256_file(digits / "digits.onnx")
    assert created["source_file"] == "digits.onnx"
    test_x, test_y = np.load(digits / "eval.npz")["X"], np.load(digits / "eval.npz")["labels"]
    labels = model.predict({"X": test_x})["label"]
    assert np.mean(labels == test_y) > 0.9
    assert report.after.accuracy == pytest.approx(np.mean(labels == test_y))
    assert report.before.accuracy > 0.95 and report.max_abs_error < 1.0
    assert set(report.after.latency_ms) == {1, 64} and report.after.latency_ms[1] > 0
    model.check_golden()
    model.close()


def test_the_profiles_precision_is_the_default(digits, tmp_path):
    profile = tmp_path / "edge-arm.toml"
    profile.write_text('description = "test board"\narch = "aarch64"\nprecision = "int8"\n')
    report = optimize(digits / "digits.onnx", tmp_path / "out.tar.gz",
                      OptimizeOptions(device=profile, latency_seconds=0.02))
    assert report.optimizations == ["quantize:int8-dynamic"] and report.device == "edge-arm"
    model = Model.load(tmp_path / "out.tar.gz")
    assert model.bundle.manifest.device["profile"] == "edge-arm"
    assert model.predict({"X": np.zeros((1, 64), np.float32)})["label"].shape == (1,)
    model.close()


def test_pipeline_errors_are_clear(digits, tmp_path, monkeypatch):
    source = digits / "digits.onnx"
    with pytest.raises(OptimizeError, match="unknown device profile 'pi-9'"):
        optimize(source, tmp_path / "a", OptimizeOptions(device="pi-9"))
    with pytest.raises(OptimizeError, match="no such folder"):
        optimize(source, tmp_path / "b", OptimizeOptions(quantize="int8",
                                                         calibration=tmp_path / "none"))
    with pytest.raises(OptimizeError, match=r"eval data .*holds \['X', 'Y'\], the model takes"):
        np.savez(tmp_path / "bad.npz", X=np.zeros((2, 64), np.float32), Y=np.zeros(2))
        optimize(source, tmp_path / "c", OptimizeOptions(eval_data=tmp_path / "bad.npz"))
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"x")
    with pytest.raises(OptimizeError, match=r"takes ONNX models \(.onnx\)"):
        optimize(tflite, tmp_path / "d", OptimizeOptions())
    monkeypatch.setitem(sys.modules, "edgerun.optimizers.tvm", None)  # as if not installed
    with pytest.raises(OptimizeError, match=r"TVM compilation needs edgerun\[tvm\]"):
        optimize(source, tmp_path / "e", OptimizeOptions(compile="tvm"))
    assert not (tmp_path / "e").exists()


def test_an_interrupted_archive_write_leaves_nothing_and_the_rerun_succeeds(mlp, tmp_path,
                                                                           monkeypatch):
    from edgerun.runtime import archive

    out, real = tmp_path / "out" / "m.tar.gz", archive._pack_tar

    def interrupted(files, dest):
        if out.parent in dest.parents:  # the delivery, not the size measurement in scratch
            real(files[:1], dest)  # part of the archive written, then Ctrl-C (or ENOSPC)
            raise KeyboardInterrupt("simulated")
        return real(files, dest)

    monkeypatch.setattr(archive, "_pack_tar", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize(mlp, out, OptimizeOptions(quantize="fp32", latency_seconds=0.02))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(archive, "_pack_tar", real)
    optimize(mlp, out, OptimizeOptions(quantize="fp32", latency_seconds=0.02))
    assert [p.name for p in out.parent.iterdir()] == ["m.tar.gz"]
    Model.load(out).check_golden()


def test_a_failed_folder_move_across_filesystems_leaves_nothing(mlp, tmp_path, monkeypatch):
    import shutil

    from edgerun.optimizers import pipeline

    out, real = tmp_path / "out" / "m", shutil.move

    def copy_fails_midway(source, dest):  # another filesystem: a copy, and the disk fills
        Path(dest).mkdir()
        shutil.copy(Path(source) / "manifest.json", dest)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.shutil, "move", copy_fails_midway)
    with pytest.raises(OSError, match="No space left"):
        optimize(mlp, out, OptimizeOptions(quantize="fp32", latency_seconds=0.02))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(pipeline.shutil, "move", real)
    optimize(mlp, out, OptimizeOptions(quantize="fp32", latency_seconds=0.02))
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    Model.load(out).check_golden()


@pytest.mark.parametrize("where", ["below a file", "in /proc"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(mlp, tmp_path, where):
    """It failed at delivery, after all the work, with an errno naming a hidden folder
    ("[Errno 2] No such file or directory: '/proc/.staging-ik9vj2rb'") or none
    ("[Errno 17] File exists: 'notes.txt'")."""
    (tmp_path / "notes.txt").write_text("mine")
    output, why = (tmp_path / "notes.txt" / "out" / "m.tar.gz",
                   f"{tmp_path / 'notes.txt'} is not a folder") if where == "below a file" \
        else (Path("/proc/edgerun-out.tar.gz"), "/proc cannot be written (")
    steps: list[str] = []
    with pytest.raises(OptimizeError) as raised:
        optimize(mlp, output, OptimizeOptions(quantize="fp32", latency_seconds=0.02),
                 progress=steps.append)
    assert str(raised.value).startswith(f"{output}: the output cannot be written there: {why}")
    assert steps == [] and (tmp_path / "notes.txt").read_text() == "mine"
    result = edgerun("optimize", str(mlp), "--device", "x86-64", "--quantize", "fp32",
                     "-o", str(output))
    assert result.returncode == 2 and "bundling" not in result.stdout
    assert result.stderr.startswith(f"error (optimize_error): {output}: the output cannot be "
                                    f"written there: {why}") and \
        len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_killed_runs_temporary_is_removed_by_the_next_run_and_a_live_ones_kept(mlp,
                                                                                  tmp_path):
    """A run killed by a signal (SIGKILL, the OOM killer) runs no cleanup: its hidden
    temporary beside the output stayed for good, and every killed run on a device or a CI
    runner added one. The next run removes those no process holds, and only those: another
    run's (in this container or another sharing the folder) is its own."""
    out = tmp_path / "out"
    out.mkdir()
    with held_elsewhere(out) as killed:  # its process ends with the block, as a kill ends it
        (killed / "m.tar.gz").write_bytes(b"\0" * 4096)
    others = [".partial-1-x", "partial-1-0123abcd", "kept.txt"]  # not staging names
    for name in others:
        (out / name).write_text("mine")
    with held_elsewhere(out) as alive:
        optimize(mlp, out / "m.tar.gz", OptimizeOptions(quantize="fp32", latency_seconds=0.02))
        assert sorted(p.name for p in out.iterdir()) == sorted([*others, alive.name, "m.tar.gz"])
    Model.load(out / "m.tar.gz").check_golden()


def test_cli_end_to_end_on_the_digits_model(digits, tmp_path):
    result = edgerun("optimize", str(digits / "digits.onnx"), "--device", "x86-64",
                     "--quantize", "int8", "--calibration", str(digits / "calibration"),
                     "--eval", str(digits / "eval.npz"), "--name", "digits", "--version", "7",
                     "-o", str(tmp_path / "digits-int8.tar.gz"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "optimized for x86-64: quantize:int8-static-qdq" in out
    for row in ("model file", "bundle .tar.gz", "latency, batch 1", "latency, batch 64",
                "max abs error", "accuracy"):
        assert row in out
    assert "x smaller" in out and "points" in out
    manifest = json.loads(edgerun("bundle", "inspect", str(tmp_path / "digits-int8.tar.gz"),
                                  "--json").stdout)
    assert manifest["version"] == "7" and manifest["device"]["profile"] == "x86-64"
    assert manifest["created"]["optimizations"] == ["quantize:int8-static-qdq"]
    verified = edgerun("bundle", "verify", str(tmp_path / "digits-int8.tar.gz"))
    assert verified.returncode == 0, verified.stderr

    wrong = edgerun("optimize", str(digits / "digits.onnx"), "--device", "pi-9",
                    "-o", str(tmp_path / "x"))
    assert wrong.returncode == 2
    assert "optimize_error" in wrong.stderr and "unknown device profile 'pi-9'" in wrong.stderr
    missing = edgerun("optimize", str(digits / "digits.onnx"), "--device", "cpu",
                      "--quantize", "int8", "--calibration", str(tmp_path / "nothing"),
                      "-o", str(tmp_path / "y"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    lonely = edgerun("optimize", str(digits / "digits.onnx"), "--device", "cpu",
                     "--structured", "-o", str(tmp_path / "z"))
    assert lonely.returncode == 2 and "--structured needs --prune" in lonely.stderr


def test_optimize_max_batch_size_0_keeps_a_sequence_model_unbatched(tmp_path):
    # nothing in x ["seq"] -> x - mean(x) says dim 0 is a sequence: without the flag the
    # optimized bundle batched it, so a daemon or Lambda serving it stacked callers' sequences
    from tests.helpers import centered_onnx

    model = tmp_path / "centered.onnx"
    model.write_bytes(centered_onnx())

    def axes(out: Path) -> list:
        manifest = json.loads(edgerun("bundle", "inspect", str(out), "--json").stdout)
        return [spec["batch_axis"] for spec in manifest["inputs"] + manifest["outputs"]]

    made = edgerun("optimize", str(model), "--device", "cpu", "--quantize", "fp32",
                   "--max-batch-size", "0", "-o", str(tmp_path / "seq"))
    assert made.returncode == 0, made.stderr
    assert axes(tmp_path / "seq") == [None, None]
    served = Model.load(tmp_path / "seq")
    x = np.array([1, 2, 3, 6], np.float32)
    np.testing.assert_allclose(served.predict({"x": x})["centered"], x - x.mean())
    served.close()
    plain = edgerun("optimize", str(model), "--device", "cpu", "--quantize", "fp32",
                    "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert axes(tmp_path / "plain") == [0, 0]
    refused = edgerun("optimize", str(model), "--device", "cpu", "--max-batch-size", "-1",
                      "-o", str(tmp_path / "bad"))
    assert refused.returncode == 2 and "or 0 for a model with no batch axis" in refused.stderr


def test_a_max_batch_size_below_the_measured_batches_is_kept_and_measured(mlp, tmp_path):
    """`--max-batch-size 4` failed after all the work with "batch of 64 exceeds the model's
    max_batch_size 4": the eval rows were predicted 256 at a time and latency timed at 64."""
    np.savez(tmp_path / "eval.npz", x=rows(10, 16))
    report = optimize(mlp, tmp_path / "b", OptimizeOptions(
        quantize="fp32", max_batch_size=4, eval_data=tmp_path / "eval.npz",
        latency_seconds=0.02))
    for side in (report.before, report.after):
        assert side.outputs["y"].shape == (10, 8)
        assert side.latency_ms[1] is not None and side.latency_ms[64] is None
    np.testing.assert_allclose(report.after.outputs["y"], run(mlp.read_bytes(), x=rows(10, 16))[0],
                               atol=1e-5)
    assert Model.load(tmp_path / "b").signature.max_batch_size == 4
    made = edgerun("optimize", str(mlp), "--device", "cpu", "--quantize", "fp32",
                   "--max-batch-size", "4", "-o", str(tmp_path / "cli"))
    assert made.returncode == 0, made.stderr
    assert re.search(r"latency, batch 64\s*│\s*n/a", made.stdout), made.stdout


def test_eval_samples_of_an_unbatched_model_are_each_fed_whole(tmp_path):
    """With --max-batch-size 0 the eval data was cut into rows along dim 0, which for a model
    with no batch axis is the sequence: every value was centered alone (all zeros: "no error"),
    the bundles' golden sample was a sequence of one, and samples stacked along a first axis
    were refused. Each entry along the file's first axis is now one sample, fed whole."""
    from edgerun.runtime import Bundle
    from tests.helpers import centered_onnx

    model = tmp_path / "centered.onnx"
    model.write_bytes(centered_onnx())
    x = np.random.default_rng(3).standard_normal((3, 5)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, labels=x.argmax(axis=1))  # the largest value's index
    report = optimize(model, tmp_path / "seq", OptimizeOptions(
        quantize="fp32", max_batch_size=0, eval_data=tmp_path / "eval.npz",
        latency_seconds=0.02))
    want = x - x.mean(axis=1, keepdims=True)
    for side in (report.before, report.after):
        np.testing.assert_allclose(side.outputs["centered"], want, atol=1e-6)
        assert side.accuracy == 1.0
    assert report.after.latency_ms[1] is not None and report.after.latency_ms[64] is None
    inputs, outputs = Bundle.open(tmp_path / "seq").golden()
    np.testing.assert_array_equal(inputs["x"], x[0])
    np.testing.assert_allclose(outputs["centered"], want[0], atol=1e-6)

    np.savez(tmp_path / "one.npz", x=x[0])  # one sequence, no axis of samples
    with pytest.raises(OptimizeError, match=re.escape(
            "'x' has shape [5]; the model has no batch axis (max_batch_size 0), so each eval "
            "sample is fed whole: stack the samples along a new first axis (shape [samples, ?])"
    )):
        optimize(model, tmp_path / "bad", OptimizeOptions(
            quantize="fp32", max_batch_size=0, eval_data=tmp_path / "one.npz"))
    assert not (tmp_path / "bad").exists()
    made = edgerun("optimize", str(model), "--device", "cpu", "--quantize", "fp32",
                   "--max-batch-size", "0", "--eval", str(tmp_path / "eval.npz"),
                   "-o", str(tmp_path / "cli"))
    assert made.returncode == 0, made.stderr
    assert "accuracy" in made.stdout and "100.00%" in made.stdout


def test_readme_optimize_example_runs(digits, tmp_path):
    # what `edgerun demo --workdir demo` leaves: the same model, held-out rows and sample
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "digits.onnx").write_bytes((digits / "digits.onnx").read_bytes())
    (demo / "heldout.npz").write_bytes((digits / "eval.npz").read_bytes())
    first = np.load(digits / "eval.npz")["X"][:1]
    (demo / "sample.json").write_text(json.dumps({"X": first.tolist()}))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S)
                if "edgerun optimize" in b]
    script = block.replace(".venv/bin/", str(Path(sys.executable).parent) + "/")
    result = subprocess.run(["bash", "-ec", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "optimized for raspberry-pi-5: quantize:int8-dynamic -> digits-pi.tar.gz" in \
        result.stdout
    assert "optimized for x86-64: prune:structured:0.5 -> digits-small" in result.stdout
    assert '"label":{"dtype":"int64","shape":[1],"data":[2]}' in result.stdout  # compact JSON
