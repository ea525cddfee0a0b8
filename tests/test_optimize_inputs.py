"""The optimizer on the inputs users really hand it: integer or float64 inputs cast to float,
string class labels, a fixed batch of 1, corrupt array files, eval data that does not fit, and
flags that apply to another step; every refusal typed and naming the culprit."""

from __future__ import annotations

import re
import socket
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgerun.examples import digits_split, mlp_onnx
from edgerun.optimizers import OptimizeError, fp16
from edgerun.optimizers.arrays import load_arrays
from edgerun.optimizers.pipeline import OptimizeOptions, optimize
from edgerun.optimizers.prune import prune_unstructured
from edgerun.optimizers.quantize import kept_float32, quantize
from edgerun.runtime import Model
from edgerun.runtime.errors import BundleError, InvalidInput
from tests.cli import edgerun

FAST = {"latency_seconds": 0.02}


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def cast_model(input_type: int, batch: int | str = "n") -> onnx.ModelProto:
    """Cast(x to float) -> MatMul -> Add: an id or float64 input, as feature pipelines give."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["xf", "w"], ["h"]),
         helper.make_node("Add", ["h", "b"], ["y"])], "cast",
        [helper.make_tensor_value_info("x", input_type, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(np.ones(4, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_run(path: Path, **feed: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


# --- fp16 --------------------------------------------------------------------------------

@pytest.mark.parametrize("input_type, dtype", [(TensorProto.INT64, np.int64),
                                               (TensorProto.DOUBLE, np.float64)])
def test_fp16_of_a_model_casting_ints_or_doubles_to_float_loads_and_agrees(tmp_path, input_type,
                                                                           dtype):
    source = save(cast_model(input_type), tmp_path / "cast.onnx")
    out = tmp_path / "h.onnx"
    assert quantize(source, out, "fp16") == "quantize:fp16"
    x = np.random.default_rng(1).integers(-3, 4, (5, 8)).astype(dtype)
    got, want = ort_run(out, x=x), ort_run(source, x=x)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_an_fp16_model_onnx_runtime_cannot_load_is_refused_naming_the_node(tmp_path):
    # EyeLike(dtype=float) keeps producing float32 where the converter declared float16
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("EyeLike", ["m"], ["eye"], name="identity_matrix",
                          dtype=TensorProto.FLOAT),
         helper.make_node("Add", ["m", "eye"], ["y"])], "eye",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")])
    source = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "eye.onnx")
    out = tmp_path / "h.onnx"
    with pytest.raises(OptimizeError, match=r"eye.onnx: fp16 conversion made a model ONNX "
                                            r"Runtime cannot load \(at node identity_matrix, "
                                            r"a EyeLike producing 'eye'\)") as caught:
        quantize(source, out, "fp16")
    assert str(out) not in str(caught.value) and not out.exists()


# --- fp16: what float16 cannot hold -------------------------------------------------------
# ONNX Runtime's CPU kernels compute most float16 ops in float32 (it drops the casts around
# them), so a float16 activation past 65504 rarely shows as inf on this host; it does on a GPU.
# onnx's reference evaluator computes float16 ops in float16, as the device does.

def assert_agrees(source: Path, converted: Path, x: np.ndarray) -> np.ndarray:
    """The fp16 model matches the float32 one on ONNX Runtime and computed in float16 (as a
    GPU would); returns the float32 outputs."""
    want = ort_run(source, x=x)
    np.testing.assert_allclose(ort_run(converted, x=x), want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(as_float16_hardware(converted, x=x), want, rtol=1e-2, atol=1e-2)
    return want


def as_float16_hardware(path: Path, **feed: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    with np.errstate(all="ignore"):
        return ReferenceEvaluator(str(path)).run(None, feed)[0]


def graph_model(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], width: int = 4,
                out: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weight_types(path: Path) -> dict[str, int]:
    return {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}


def test_fp16_keeps_the_layer_whose_weight_is_past_float16s_range_float32(tmp_path):
    # the converter clamped every weight past 1e4 to 1e4: this layer answered 100x too small
    rng = np.random.default_rng(0)
    huge = rng.standard_normal((8, 4)).astype(np.float32)
    huge[0] = 1e6
    source = save(graph_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="hidden"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="huge")],
        {"w1": rng.standard_normal((4, 8)), "w2": huge}), tmp_path / "huge.onnx")
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", **FAST))
    assert report.optimizations == ["quantize:fp16"]
    assert list(report.fp16_kept_float32) == ["huge"]
    assert report.fp16_kept_float32["huge"].startswith(
        "MatMul: weight 'w2' reaches 1e+06 in magnitude, beyond float16's largest, 65504")
    assert any("huge (MatMul: weight 'w2' reaches 1e+06" in note for note in report.notes)
    model = Model.load(tmp_path / "out")
    assert model.bundle.manifest.created["fp16_kept_float32"] == report.fp16_kept_float32
    model_file = tmp_path / "out" / model.bundle.manifest.model_file
    assert weight_types(model_file) == {"w1": TensorProto.FLOAT16, "w2": TensorProto.FLOAT}
    x = rng.standard_normal((16, 4)).astype(np.float32)
    want = ort_run(source, x=x)
    np.testing.assert_allclose(model.predict({"x": x})["y"], want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(as_float16_hardware(model_file, x=x), want, rtol=1e-2, atol=1)
    model.check_golden()
    model.close()


def test_fp16_keeps_an_epsilon_below_float16s_range_and_what_reads_its_sum(tmp_path):
    # log(relu(h) + 1e-9): the converter raised the 1e-9 to 1.2e-7 (log -15.9, not -20.7);
    # kept float32 but its sum rounded to float16, 1e-9 becomes 0 and the log -inf
    rng = np.random.default_rng(0)
    source = save(graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Add", ["r", "eps"], ["a"], name="add_eps"),
         helper.make_node("Log", ["a"], ["y"], name="log")],
        {"w": rng.standard_normal((4, 4)), "eps": np.full(4, 1e-9)}), tmp_path / "eps.onnx")
    out = tmp_path / "h.onnx"
    assert quantize(source, out, "fp16") == "quantize:fp16"
    kept = kept_float32(out)
    assert list(kept) == ["add_eps", "log"]
    assert kept["add_eps"] == ("Add: weight 'eps' lies below float16's range (its largest "
                               "magnitude is 1e-09): float16 would change it by 1.18e+04 %")
    assert kept["log"] == "Log: 'a' comes from 'add_eps', which reads weight 'eps'"
    assert weight_types(out) == {"w": TensorProto.FLOAT16, "eps": TensorProto.FLOAT}
    x = rng.standard_normal((16, 4)).astype(np.float32)
    want = assert_agrees(source, out, x)
    assert (want < -20).any()  # rows where relu gave 0: log(1e-9)


def test_fp16_keeps_activations_past_float16s_range_float32(tmp_path):
    # x * 1e3 * 1e3: every weight fits float16, the activation 'h2' does not (inf on a GPU);
    # 'k' is shared by a float16 and a float32 node, 'h2' read by two float32 nodes
    source = save(graph_model(
        [helper.make_node("Mul", ["x", "k"], ["h1"], name="scale1"),
         helper.make_node("Mul", ["h1", "k"], ["h2"], name="scale2"),
         helper.make_node("Mul", ["h2", "s1"], ["a"], name="rescale_a"),
         helper.make_node("Mul", ["h2", "s2"], ["b"], name="rescale_b"),
         helper.make_node("Add", ["a", "b"], ["y"], name="sum")],
        {"k": np.full(4, 1e3), "s1": np.full(4, 1e-4), "s2": np.full(4, 2e-4)}),
        tmp_path / "scale.onnx")
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp16", eval_data=tmp_path / "eval.npz", **FAST))
    kept = report.fp16_kept_float32
    assert list(kept) == ["scale2", "rescale_a", "rescale_b"]
    peak = np.abs(x).max() * 1e6
    assert kept["scale2"] == (f"Mul: 'h2' reaches {peak:.3g} in magnitude on the data "
                              "measured, beyond float16's largest, 65504")
    model_file = tmp_path / "out" / "model.onnx"
    types = weight_types(model_file)
    assert types["k"] == TensorProto.FLOAT16 and types["s1"] == types["s2"] == TensorProto.FLOAT
    want = ort_run(source, x=x)
    got = as_float16_hardware(model_file, x=x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert report.max_abs_error < 1e-2 * np.abs(want).max()


def test_fp16_keeps_a_constant_past_float16s_range_float32(tmp_path):
    source = save(graph_model(
        [helper.make_node("Constant", [], ["c"], name="const",
                          value=numpy_helper.from_array(np.full(4, 1e6, np.float32))),
         helper.make_node("Mul", ["x", "c"], ["h"], name="big"),
         helper.make_node("Mul", ["h", "s"], ["y"], name="small")],
        {"s": np.full(4, 1e-3)}), tmp_path / "const.onnx")
    out = tmp_path / "h.onnx"
    quantize(source, out, "fp16")
    assert list(kept_float32(out)) == ["const", "big", "small"]
    x = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    assert_agrees(source, out, x)


def test_fp16_stores_weights_up_to_65504_rather_than_clamping_them_to_1e4(tmp_path):
    # float16 holds 12000 (within 8 of it); the converter's default clamped it to 10000
    source = save(graph_model([helper.make_node("Mul", ["x", "w"], ["y"], name="scale")],
                              {"w": np.full(4, 12000.0)}), tmp_path / "w.onnx")
    out = tmp_path / "h.onnx"
    quantize(source, out, "fp16")
    assert kept_float32(out) == {}
    weight = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    assert weight.dtype == np.float16 and (weight == 12000).all()
    x = np.random.default_rng(3).uniform(-1, 1, (16, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x=x), ort_run(source, x=x), rtol=1e-3)


def test_fp16_of_an_ordinary_model_keeps_nothing_float32(tmp_path):
    source = tmp_path / "mlp.onnx"
    source.write_bytes(mlp_onnx([16, 64, 8]))
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", **FAST))
    assert report.fp16_kept_float32 == {} and not any("fp16" in n for n in report.notes)
    model = Model.load(tmp_path / "out")
    assert "fp16_kept_float32" not in model.bundle.manifest.created
    converted = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {init.data_type for init in converted.graph.initializer} == {TensorProto.FLOAT16}
    assert not converted.metadata_props
    # float32 only at the edges: one Cast in from the input, one out to the output
    casts = [node for node in converted.graph.node if node.op_type == "Cast"]
    assert len(casts) == 2 and len(converted.graph.node) == len(
        onnx.load(str(source)).graph.node) + 2
    model.close()


@pytest.mark.parametrize("opset, ir_version", [(9, 3), (13, 7)])
def test_fp16_of_a_model_whose_weights_are_also_graph_inputs_loads_and_agrees(tmp_path, opset,
                                                                             ir_version):
    """Older exporters and the ONNX model zoo list every weight among the graph inputs too
    (IR 3 required it): the converter made them float16 under float32 input declarations, a
    model ONNX Runtime refused ("Data in initializer 'w' has element type tensor(float16)")."""
    cast = cast_model(TensorProto.FLOAT)
    graph = cast.graph
    graph.input.extend(helper.make_tensor_value_info(init.name, TensorProto.FLOAT,
                                                     list(init.dims))
                       for init in graph.initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    source = tmp_path / "zoo.onnx"
    onnx.save(model, str(source))
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", **FAST))
    assert report.optimizations == ["quantize:fp16"] and report.max_abs_error < 0.05
    served = Model.load(tmp_path / "out")
    served.check_golden()
    assert [spec.name for spec in served.signature.inputs] == ["x"]
    served.close()
    converted = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {init.data_type for init in converted.graph.initializer} == {TensorProto.FLOAT16}


def weights_as_inputs(model: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    """`model` as older exporters and the ONNX model zoo write it: every weight also a graph
    input (IR 3 required it)."""
    graph = model.graph
    graph.input.extend(helper.make_tensor_value_info(init.name, TensorProto.FLOAT,
                                                     list(init.dims))
                       for init in graph.initializer)
    made = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    made.ir_version = ir_version
    return made


@pytest.mark.parametrize("opset, ir_version", [(9, 3), (13, 7)])
def test_structured_pruning_of_a_model_whose_weights_are_also_graph_inputs(tmp_path, opset,
                                                                          ir_version):
    """Every layer was left whole ("initializer 'w0' is also a graph input"), so the model was
    refused: its input declarations would keep the weights' old shapes."""
    source = tmp_path / "zoo.onnx"
    onnx.save(weights_as_inputs(onnx.load_from_string(mlp_onnx([16, 32, 32, 8])), opset,
                                ir_version), str(source))
    report = optimize(source, tmp_path / "out",
                      OptimizeOptions(quantize="fp32", prune=0.5, structured=True, **FAST))
    assert report.optimizations == ["prune:structured:0.5"]
    assert report.prune.layers[:2] == ["(Gemm): 32 -> 16", "(Gemm): 32 -> 16"]
    served = Model.load(tmp_path / "out")
    served.check_golden()
    assert [spec.name for spec in served.signature.inputs] == ["x"]
    assert served.predict({"x": np.ones((3, 16), np.float32)})["y"].shape == (3, 8)
    served.close()
    pruned = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [i.name for i in pruned.graph.input] == ["x"]


def test_strict_fp16_refuses_naming_the_weight_and_its_magnitude(tmp_path):
    source = save(graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                              {"w": np.full((4, 4), 1e6)}), tmp_path / "huge.onnx")
    message = (r"huge.onnx: strict fp16: weight 'w' reaches 1e\+06 in magnitude, beyond "
               r"float16's largest, 65504.*without strict, the nodes that make or read them "
               r"stay float32")
    with pytest.raises(OptimizeError, match=message):
        quantize(source, tmp_path / "h.onnx", "fp16", strict=True)
    with pytest.raises(OptimizeError, match=message):
        optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", strict_fp16=True))
    with pytest.raises(OptimizeError, match="strict fp16 applies to fp16 only, not int8"):
        optimize(source, tmp_path / "out", OptimizeOptions(quantize="int8", strict_fp16=True))
    refused = edgerun("optimize", str(source), "--device", "x86-64", "--quantize", "fp16",
                      "--strict-fp16", "-o", str(tmp_path / "out"))
    assert refused.returncode != 0 and "weight 'w' reaches 1e+06" in refused.stdout + \
        refused.stderr
    assert not (tmp_path / "h.onnx").exists() and not (tmp_path / "out").exists()


def test_an_fp16_bundle_giving_inf_where_float32_does_not_is_refused_naming_the_node(tmp_path):
    # ranges are measured on the first RANGE_ROWS eval rows; later rows reach past 65504, and
    # LayerNormalization (one of the ops ONNX Runtime's CPU runs in float16) turns it to NaN
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["h"], name="scale"),
         helper.make_node("LayerNormalization", ["h", "gamma"], ["y"], name="norm")], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(np.full(8, 1e3, np.float32), "k"),
         numpy_helper.from_array(np.ones(8, np.float32), "gamma")])
    source = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "ln.onnx")
    x = np.random.default_rng(4).uniform(-1, 1, (fp16.RANGE_ROWS + 8, 8)).astype(np.float32)
    x[-8:] *= 1000
    np.savez(tmp_path / "eval.npz", x=x)
    with pytest.raises(OptimizeError, match=(
            rf"ln.onnx: the optimized model gives inf or NaN in output 'y' on 8 of "
            rf"{fp16.RANGE_ROWS + 8} eval rows \(first: row {fp16.RANGE_ROWS}\) where the "
            r"original model's values are finite; in float16 it starts at node 'scale' \(Mul\), "
            rf"whose output 'h' holds \d+ inf/NaN value\(s\).*first {fp16.RANGE_ROWS} eval rows")):
        optimize(source, tmp_path / "out", OptimizeOptions(
            quantize="fp16", eval_data=tmp_path / "eval.npz", **FAST))
    assert not (tmp_path / "out").exists()
    # with those rows among the first, 'scale' and 'norm' stay float32 and the bundle is sound
    np.savez(tmp_path / "first.npz", x=x[::-1])
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp16", eval_data=tmp_path / "first.npz", **FAST))
    assert list(report.fp16_kept_float32) == ["scale", "norm"]
    assert np.isfinite(report.after.outputs["y"]).all()


def test_fp16_of_inputs_read_by_unnamed_nodes_and_float_constants_loads(tmp_path):
    # the converter named its Casts after the nodes they feed: two unnamed readers of 'x' got
    # two Casts named 'x_cast_to_', and a Constant value_float stayed float32 under a float16
    # declaration; either model was one ONNX Runtime refuses
    for name, nodes in {
            "readers": [helper.make_node("Mul", ["x", "w"], ["a"]),
                        helper.make_node("Add", ["x", "w"], ["b"]),
                        helper.make_node("Add", ["a", "b"], ["y"])],
            "constant": [helper.make_node("Constant", [], ["c"], value_float=2.0),
                         helper.make_node("MatMul", ["x", "w4"], ["h"]),
                         helper.make_node("Mul", ["h", "c"], ["y"])]}.items():
        source = save(graph_model(nodes, {"w": np.full(4, 0.5), "w4": np.eye(4)}),
                      tmp_path / f"{name}.onnx")
        out = tmp_path / f"{name}-h.onnx"
        quantize(source, out, "fp16")
        x = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, x=x), ort_run(source, x=x), rtol=1e-2,
                                   atol=1e-2)


def test_fp16_of_a_model_that_outputs_a_value_it_also_reads_loads_and_agrees(tmp_path):
    # features and logits, as a transformer gives hidden states beside its head's output: the
    # converter cast 'features' back to float32 under its name, and 'relu', computing in
    # float16, read that float32 value, a model ONNX Runtime refuses
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["features"], name="mm1"),
         helper.make_node("Relu", ["features"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2")], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")])
    source = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "two.onnx")
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", **FAST))
    assert report.fp16_kept_float32 == {}
    model = Model.load(tmp_path / "out")
    assert [(o.name, o.dtype) for o in model.signature.outputs] == [("logits", "float32"),
                                                                    ("features", "float32")]
    x = rng.standard_normal((16, 4)).astype(np.float32)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for got, want in zip(model.predict({"x": x}).values(), session.run(None, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    model.close()


def loop_body(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    """A Loop body carrying `acc` ([n, 4] float) through `nodes`, which make acc_out from
    acc_in (and may read the iteration number i); it never stops early."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"), *nodes],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n", 4])])


def loop_constants() -> list[onnx.TensorProto]:
    """The Loop's `trip` count (3) and its `true` condition."""
    return [numpy_helper.from_array(np.array(3, np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "true")]


def loop_model(k: float = 1.5, body_scale: float = 1.0, outer_scale: float = 1.0,
               up_inside: bool = False) -> onnx.ModelProto:
    """x @ w, then a Loop multiplying by k three times and by `body_scale` and back in its
    body (`up_inside`: the body's own Constant, else a weight outside it); a Mul reads k
    outside the loop too."""
    up = [helper.make_node("Constant", [], ["up"], name="up_value", value=numpy_helper.from_array(
        np.full(4, body_scale, np.float32)))] if up_inside else []
    body = loop_body([*up, helper.make_node("Mul", ["acc_in", "k"], ["scaled"], name="by_k"),
                      helper.make_node("Mul", ["scaled", "up"], ["upped"], name="up"),
                      helper.make_node("Mul", ["upped", "down"], ["acc_out"], name="down")])
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Mul", ["h", "outer"], ["big"], name="blow_up"),
         helper.make_node("Add", ["big", "k"], ["big_k"], name="add_k"),
         helper.make_node("Mul", ["big_k", "inner"], ["h2"], name="shrink"),
         helper.make_node("Loop", ["trip", "true", "h2"], ["y"], body=body, name="loop")],
        {"w": np.random.default_rng(7).standard_normal((4, 4)), "k": np.full(4, k),
         **({} if up_inside else {"up": np.full(4, body_scale)}),
         "down": np.full(4, 1 / body_scale),
         "outer": np.full(4, outer_scale), "inner": np.full(4, 1 / outer_scale)})
    model.graph.initializer.extend(loop_constants())
    return model


@pytest.mark.parametrize("options, reason", [
    ({"body_scale": 1e6}, r"Loop: .*weight 'up' reaches 1e\+06 in magnitude"),
    ({"body_scale": 1e6, "up_inside": True}, r"Loop: .*weight 'up' reaches 1e\+06 in magnitude"),
    ({"body_scale": 5000.0}, r"Loop: 'upped' reaches .* in magnitude on the data measured"),
    ({"k": 100.0}, r"Loop: 'y' reaches .* in magnitude on the data measured")])
def test_fp16_refuses_a_loop_that_would_stay_float32_naming_it(tmp_path, options, reason):
    # a weight only a Loop body reads was not kept float32: 'up' was clamped to 65504, silently
    # (the body's own Constant too); a value only the body makes ('upped', x * 5000, scaled
    # back before the body's end) was not measured, so it overflowed float16, silently;
    # a Loop kept float32 (its output, x * 100 ** 3, passes 65504) kept its body float32 but
    # the converter converted the weights it reads from outside, a model ONNX Runtime refuses
    source = save(loop_model(**options), tmp_path / "l.onnx")
    with pytest.raises(OptimizeError, match=rf"l.onnx: fp16 cannot keep node 'loop' float32 "
                                            rf"\({reason}.*choose fp32 or int8"):
        quantize(source, tmp_path / "h.onnx", "fp16")
    assert not (tmp_path / "h.onnx").exists()


def if_model(scale: float = 1.0) -> onnx.ModelProto:
    """x @ w, then an If on the sign of its sum: each branch multiplies by `scale` (then) or
    by 2 * `scale` (else) and back."""
    def branch(name: str, by: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["h", f"{name}_up"], [f"{name}_big"], name=f"{name}_up"),
             helper.make_node("Mul", [f"{name}_big", f"{name}_down"], [f"{name}_y"],
                              name=f"{name}_down")], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["n", 4])],
            [numpy_helper.from_array(np.full(4, by, np.float32), f"{name}_up"),
             numpy_helper.from_array(np.full(4, 1 / by, np.float32), f"{name}_down")])
    return graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("ReduceSum", ["h"], ["total"], name="sum", keepdims=0),
         helper.make_node("Greater", ["total", "zero"], ["positive"], name="sign"),
         helper.make_node("If", ["positive"], ["y"], name="branch",
                          then_branch=branch("then", scale),
                          else_branch=branch("else", 2 * scale))],
        {"w": np.random.default_rng(7).standard_normal((4, 4)), "zero": np.zeros(())})


def scan_model(scale: float = 1.0) -> onnx.ModelProto:
    """x @ w, then a Scan over its rows summing each row times `scale` and back, with the
    scaled-back rows as a scan output."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["row", "row_up"], ["row_big"], name="row_up"),
         helper.make_node("Mul", ["row_big", "row_down"], ["row_back"], name="row_down"),
         helper.make_node("Add", ["total_in", "row_back"], ["total_out"], name="row_add")],
        "body", [helper.make_tensor_value_info("total_in", TensorProto.FLOAT, [4]),
                 helper.make_tensor_value_info("row", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("total_out", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("row_back", TensorProto.FLOAT, [4])])
    return graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Scan", ["start", "h"], ["total", "y"], name="scan", body=body,
                          num_scan_inputs=1, scan_output_axes=[0])],
        {"w": np.random.default_rng(7).standard_normal((4, 4)), "start": np.zeros(4),
         "row_up": np.full(4, scale), "row_down": np.full(4, 1 / scale)})


@pytest.mark.parametrize("make, inner", [
    (loop_model, {"scaled": 1.5, "upped": 1.5, "acc_out": 1.5}),
    (if_model, {"then_big": 1.0, "then_y": 1.0, "else_big": 2.0, "else_y": 1.0}),
    (scan_model, {"row_big": 1.0, "row_back": 1.0, "total_out": None})])
def test_fp16_measures_the_values_inside_if_loop_and_scan_bodies(make, inner):
    """Each body value's largest magnitude, as the float32 model makes it: x @ w times what
    the body multiplies it by (the Loop: x @ w + 1.5, by 1.5 three times); the If's branches
    as each was taken (both are, over the chunks)."""
    model = make()
    fp16.prepare(model)
    x = np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32)
    feeds = [{"x": x[i:i + 8]} for i in range(0, 64, 8)]
    ranges = fp16.measure(model, feeds)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    h = x @ w
    branch = [(chunk.sum() > 0) for chunk in np.split(h, 8)]
    assert any(branch) and not all(branch)  # the If's then and else both run
    for value, by in inner.items():
        if make is loop_model:  # the Loop starts from x @ w + k
            want = np.abs(h + 1.5).max() * 1.5 ** 3
        elif make is if_model:
            taken = [c for c, then in zip(np.split(h, 8), branch)
                     if then == value.startswith("then")]
            want = np.abs(np.concatenate(taken)).max() * by
        elif by is None:  # the Scan's running sum
            want = max(np.abs(np.cumsum(c, axis=0)).max() for c in np.split(h, 8))
        else:
            want = np.abs(h).max() * by
        assert ranges[value].peak == pytest.approx(want, rel=1e-5), value
    assert not any(name.endswith(("_shown", "_out")) and name not in inner for name in ranges)


def test_a_body_value_whose_shape_changes_with_the_iteration_is_measured():
    """A Loop body value whose shape changes with the iteration (acc[:, :i]) could not be a
    scan output: ONNX Runtime refused the run, and no body was measured. Its summary can."""
    body = loop_body([
        helper.make_node("Unsqueeze", ["i", "zero1"], ["upto"], name="upto"),
        helper.make_node("Slice", ["acc_in", "zero1", "upto", "one1"], ["prefix"], name="cut"),
        helper.make_node("ReduceSum", ["prefix", "one1"], ["prefix_sum"], name="sum"),
        helper.make_node("Add", ["acc_in", "prefix_sum"], ["acc_out"], name="grow")])
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Loop", ["trip", "true", "h"], ["y"], body=body, name="loop")],
        {"w": np.eye(4)})
    model.graph.initializer.extend([*loop_constants(),
                                    numpy_helper.from_array(np.array([0], np.int64), "zero1"),
                                    numpy_helper.from_array(np.array([1], np.int64), "one1")])
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    ranges = fp16.measure(model, [{"x": x}])
    acc, peak = x.astype(np.float64), 0.0
    for i in range(3):
        peak = max([peak, *np.abs(acc[:, :i]).ravel()])
        acc = acc + acc[:, :i].sum(axis=1, keepdims=True)
    assert ranges["prefix"].peak == pytest.approx(peak, rel=1e-5)
    assert ranges["acc_out"].peak == pytest.approx(np.abs(acc).max(), rel=1e-5)


def if_in_loop_model(up: float) -> onnx.ModelProto:
    """x @ w, then a Loop of three whose body's If takes its then branch at even iterations
    (times `up` twice, then back) and its else branch at odd ones (times 2, then back)."""
    def branch(name: str, by: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["acc_in", f"{name}_up"], [f"{name}_mid"]),
             helper.make_node("Mul", [f"{name}_mid", f"{name}_up"], [f"{name}_big"]),
             helper.make_node("Mul", [f"{name}_big", f"{name}_down"], [f"{name}_back"]),
             helper.make_node("Mul", [f"{name}_back", f"{name}_down"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["n", 4])],
            [numpy_helper.from_array(np.full(4, by, np.float32), f"{name}_up"),
             numpy_helper.from_array(np.full(4, 1 / by, np.float32), f"{name}_down")])
    body = loop_body([helper.make_node("Mod", ["i", "two"], ["odd"]),
                      helper.make_node("Equal", ["odd", "zero"], ["even"]),
                      helper.make_node("If", ["even"], ["acc_out"], then_branch=branch("then", up),
                                       else_branch=branch("else", 2.0))])
    body.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "two"),
                             numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = graph_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                         helper.make_node("Loop", ["trip", "true", "h"], ["y"], body=body)],
                        {"w": np.random.default_rng(7).standard_normal((4, 4))})
    model.graph.initializer.extend(loop_constants())
    return model


def test_fp16_measures_an_if_whose_branch_changes_inside_a_loop(tmp_path):
    """The If's untaken branch gave an empty tensor where the taken one gave [n, 4]: stacked
    per iteration by the Loop, ONNX Runtime refused the run, no body was measured, and
    'then_big' (x @ w times 90,000) overflowed float16 silently."""
    model = if_in_loop_model(up=300.0)
    fp16.prepare(model)
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    ranges = fp16.measure(model, [{"x": x}])
    h = np.abs(x @ numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)).max()
    assert ranges["then_big"].peak == pytest.approx(h * 300 * 300, rel=1e-4)
    assert ranges["else_big"].peak == pytest.approx(h * 4, rel=1e-4)
    source = save(if_in_loop_model(up=300.0), tmp_path / "m.onnx")
    with pytest.raises(OptimizeError, match=r"fp16 cannot keep node '\w+' float32 \(Loop: "
                                            r"'then_big' reaches .* in magnitude on the data"):
        quantize(source, tmp_path / "h.onnx", "fp16")
    quantize(save(if_in_loop_model(up=3.0), tmp_path / "small.onnx"), tmp_path / "h.onnx", "fp16")


def test_fp16_measures_a_loop_inside_a_loop():
    """An inner Loop's values reach the outer body as summaries per inner iteration, merged
    there into one per outer iteration: 'inner_big' is x @ w times 3, three times over."""
    inner = helper.make_graph(
        [helper.make_node("Identity", ["inner_cond_in"], ["inner_cond_out"]),
         helper.make_node("Mul", ["inner_in", "three"], ["inner_big"]),
         helper.make_node("Mul", ["inner_big", "third"], ["inner_out"])], "inner",
        [helper.make_tensor_value_info("j", TensorProto.INT64, []),
         helper.make_tensor_value_info("inner_cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("inner_in", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("inner_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, ["n", 4])])
    body = loop_body([helper.make_node("Loop", ["trip", "true", "acc_in"], ["acc_out"],
                                       body=inner)])
    model = graph_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                         helper.make_node("Loop", ["trip", "true", "h"], ["y"], body=body)],
                        {"w": np.eye(4), "three": np.full(4, 3.0), "third": np.full(4, 1 / 3)})
    model.graph.initializer.extend(loop_constants())
    fp16.prepare(model)
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    ranges = fp16.measure(model, [{"x": x}])
    assert ranges["inner_big"].peak == pytest.approx(np.abs(x).max() * 3, rel=1e-5)
    assert ranges["inner_out"].peak == pytest.approx(np.abs(x).max(), rel=1e-5)
    assert ranges["inner_big"].square == pytest.approx(9 * 9 * np.square(x, dtype=float).sum(),
                                                       rel=1e-5)  # 3 x 3 iterations


def test_bodies_whose_values_cannot_be_shown_leave_the_graphs_measured(caplog):
    """At opset 9 the summaries' IsInf does not exist and the run with them fails: the
    graph's own values are measured all the same, and the log says the bodies' were not."""
    model = loop_model()
    model.opset_import[0].version = 9
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="edgerun.optimizers.fp16"):
        ranges = fp16.measure(model, [{"x": x}])
    assert ranges is not None and {"x", "h", "y"} <= set(ranges) and "upped" not in ranges
    assert "inside If, Loop and Scan bodies not measured" in caplog.text


@pytest.mark.parametrize("make, culprit", [(if_model, "then_big"), (scan_model, "row_big")])
def test_fp16_refuses_an_if_or_scan_whose_body_passes_float16s_range(tmp_path, make, culprit):
    source = save(make(scale=5e4), tmp_path / "m.onnx")
    with pytest.raises(OptimizeError, match=rf"m.onnx: fp16 cannot keep node '\w+' float32 "
                                            rf"\(\w+: .*'{culprit}' reaches .* in magnitude on "
                                            rf"the data measured"):
        quantize(source, tmp_path / "h.onnx", "fp16")
    save(make(scale=4.0), tmp_path / "small.onnx")
    quantize(tmp_path / "small.onnx", tmp_path / "h.onnx", "fp16")  # in range: converted
    assert kept_float32(tmp_path / "h.onnx") == {}


def test_fp16_of_a_weight_a_float32_node_shares_with_a_loop_body_loads_and_agrees(tmp_path):
    # 'k' is read by 'add_k', kept float32 (its input passes 65504), and by the float16 Loop
    # body: it stayed float32 for both, and the body's float16 Mul read a float32 weight
    source = save(loop_model(outer_scale=1e5), tmp_path / "l.onnx")
    out = tmp_path / "h.onnx"
    quantize(source, out, "fp16")
    assert list(kept_float32(out)) == ["blow_up", "add_k", "shrink"]
    x = np.random.default_rng(8).standard_normal((16, 4)).astype(np.float32)
    assert_agrees(source, out, x)


def test_the_error_reported_counts_the_values_beside_a_log_of_zero(tmp_path):
    # log(relu(x @ w)) is -inf in float32 and float16 alike where relu gives 0; the error was
    # then NaN for the whole output and reported as 0
    rng = np.random.default_rng(9)
    source = save(graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Log", ["r"], ["y"], name="log")], {"w": rng.standard_normal((4, 4))}),
        tmp_path / "log.onnx")
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((64, 4)).astype(np.float32))
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp16", eval_data=tmp_path / "eval.npz", **FAST))
    want, got = report.before.outputs["y"], report.after.outputs["y"]
    assert np.isneginf(want).any() and (np.isneginf(got) == np.isneginf(want)).all()
    finite = np.isfinite(want)
    assert report.max_abs_error == pytest.approx(np.abs(got[finite] - want[finite]).max())
    assert report.max_abs_error > 0


def test_labels_that_change_are_counted_not_reported_as_no_error(tmp_path):
    # a model whose only output is its class: max abs error covers float outputs, so 80 %
    # pruning that flipped most labels was reported as "max abs error 0"
    model = onnx.load_from_string(mlp_onnx([16, 64, 10]))
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64,
                                                            ["batch"]))
    source = save(model, tmp_path / "argmax.onnx")
    report = optimize(source, tmp_path / "out", OptimizeOptions(prune=0.8, **FAST))
    want, got = report.before.outputs["label"], report.after.outputs["label"]
    differ = int(np.count_nonzero(got != want))
    assert differ > 0 and report.max_abs_error is None
    assert report.changed_rows == {"label": (differ, len(want))}
    result = edgerun("optimize", str(source), "--device", "cpu", "--prune", "0.8",
                     "-o", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    assert f"{differ} of {len(want)}" in result.stdout and "max abs error" not in result.stdout


def test_the_model_size_of_an_external_data_model_counts_its_data_file(tmp_path):
    # weights in a side file: the model file alone is a few hundred bytes, and the int8 result
    # (weights inline) was reported 100x larger than the model it shrank
    source = tmp_path / "m.onnx"
    onnx.save(onnx.load_from_string(mlp_onnx([16, 128, 8])), str(source),
              save_as_external_data=True, location="m.data", size_threshold=0)
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="int8", **FAST))
    before, after = report.before.sizes, report.after.sizes
    assert before.model == source.stat().st_size + (tmp_path / "m.data").stat().st_size
    assert after.model == (tmp_path / "out" / "model.onnx").stat().st_size
    assert after.model < before.model / 2 and after.model_gzip < before.model_gzip / 2


# --- accuracy and eval data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    """A classifier trained on class names (a `label` output of strings), and eval data with
    string labels, integer labels, and one-hot labels."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("classes")
    train_x, train_y, test_x, test_y = digits_split()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    classifier = LogisticRegression(max_iter=300).fit(train_x, names[train_y])
    model = to_onnx(classifier, train_x[:1], options={"zipmap": False}, target_opset=17)
    (folder / "names.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "names.npz", X=test_x, labels=names[test_y])
    np.savez(folder / "indices.npz", X=test_x, labels=test_y)
    np.savez(folder / "onehot.npz", X=test_x, labels=np.eye(10)[test_y])
    np.savez(folder / "empty.npz", X=test_x[:0], labels=test_y[:0])
    return folder


def test_string_class_labels_are_compared_as_text(classes, tmp_path):
    report = optimize(classes / "names.onnx", tmp_path / "out",
                      OptimizeOptions(quantize="fp32", eval_data=classes / "names.npz", **FAST))
    assert report.before.accuracy > 0.9 and report.after.accuracy == report.before.accuracy


def test_labels_of_the_other_kind_are_refused_and_no_bundle_is_left(classes, tmp_path):
    with pytest.raises(OptimizeError, match=r"predicts class names \('[a-z]+', .* eval `labels` "
                                            r"are class indices \(\d, .*store the labels as "
                                            r"class names"):
        optimize(classes / "names.onnx", tmp_path / "out",
                 OptimizeOptions(quantize="fp32", eval_data=classes / "indices.npz", **FAST))
    # the failure came while measuring: nothing that looks like a bundle is left, and the
    # rerun with the right labels is not refused for a non-empty output
    assert not (tmp_path / "out").exists()
    optimize(classes / "names.onnx", tmp_path / "out",
             OptimizeOptions(quantize="fp32", eval_data=classes / "names.npz", **FAST))
    assert Model.load(tmp_path / "out").signature.inputs[0].name == "X"


def test_eval_labels_must_be_one_per_row_and_rows_must_exist(classes, tmp_path):
    with pytest.raises(OptimizeError, match=r"onehot.npz: `labels` has shape \[397, 10\]; it "
                                            r"should hold one class per row: shape \[397\]"):
        optimize(classes / "names.onnx", tmp_path / "a", OptimizeOptions(
            quantize="fp32", eval_data=classes / "onehot.npz", **FAST))
    with pytest.raises(OptimizeError, match=r"empty.npz: no rows to measure on"):
        optimize(classes / "names.onnx", tmp_path / "b", OptimizeOptions(
            quantize="fp32", eval_data=classes / "empty.npz", **FAST))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def binary_model(sigmoid: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """x [N, 6] @ w: a probability [N, 1] (Sigmoid) or a logit [N] (w of shape [6])."""
    w = np.random.default_rng(0).standard_normal((6, 1) if sigmoid else (6,)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z" if sigmoid else "y"])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["y"]))
    graph = helper.make_graph(
        nodes, "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1] if sigmoid else ["n"])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


@pytest.mark.parametrize("sigmoid", [True, False])
def test_a_binary_classifier_with_one_output_column_is_scored_by_threshold(tmp_path, sigmoid):
    model, w = binary_model(sigmoid)
    source = save(model, tmp_path / "binary.onnx")
    x = np.random.default_rng(1).standard_normal((200, 6)).astype(np.float32)
    labels = ((x @ w).reshape(-1) > 0).astype(np.int64)  # right on every row by construction
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp32", eval_data=tmp_path / "eval.npz", **FAST))
    assert report.before.accuracy == 1.0 and report.after.accuracy == 1.0


def text_model() -> onnx.ModelProto:
    """A category name [N, 1] (string) -> LabelEncoder -> OneHot -> MatMul: a text input, as
    feature pipelines take."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LabelEncoder", ["s"], ["i"], domain="ai.onnx.ml",
                          keys_strings=["a", "b", "c", ""], values_int64s=[0, 1, 2, 3]),
         helper.make_node("OneHot", ["i", "depth", "values"], ["hot"], axis=-1),
         helper.make_node("Reshape", ["hot", "rows"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])], "text",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(np.array(4, np.int64), "depth"),
         numpy_helper.from_array(np.array([0, 1], np.float32), "values"),
         numpy_helper.from_array(np.array([-1, 4], np.int64), "rows")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("ai.onnx.ml", 2)])


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_a_text_input_is_measured_on_generated_strings_without_eval_data(tmp_path, precision):
    """Generated eval data held the integer 0 for a string input, which every run refused
    ("input 's': expected string, got int"): text inputs get empty strings, as the golden
    sample does."""
    source = save(text_model(), tmp_path / "text.onnx")
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize=precision, **FAST))
    assert report.before.outputs["y"].shape == (64, 3) and report.max_abs_error < 0.05
    model = Model.load(tmp_path / "out")
    model.check_golden()
    assert model.predict({"s": np.array([["b"]], dtype=object)})["y"].shape == (1, 3)
    model.close()


def test_a_fixed_batch_of_one_is_evaluated_row_by_row(tmp_path):
    source = save(cast_model(TensorProto.FLOAT, batch=1), tmp_path / "one.onnx")
    x = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp16", eval_data=tmp_path / "eval.npz", **FAST))
    assert report.before.outputs["y"].shape == (20, 4)
    want = np.concatenate([ort_run(source, x=x[i:i + 1]) for i in range(20)])
    np.testing.assert_allclose(report.before.outputs["y"], want, rtol=1e-6)
    assert report.max_abs_error < 0.05
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 9), np.float32))
    with pytest.raises(OptimizeError, match=r"wide.npz: row 0: input 'x'"):
        optimize(source, tmp_path / "bad", OptimizeOptions(eval_data=tmp_path / "wide.npz"))


def test_a_fixed_batch_of_eight_is_evaluated_eight_rows_at_a_time(tmp_path):
    source = save(cast_model(TensorProto.FLOAT, batch=8), tmp_path / "eight.onnx")
    report = optimize(source, tmp_path / "synthetic", OptimizeOptions(quantize="int8", **FAST))
    assert report.before.outputs["y"].shape == (8, 4) and report.max_abs_error < 0.5
    x = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="fp16", eval_data=tmp_path / "eval.npz", **FAST))
    want = np.concatenate([ort_run(source, x=x[i:i + 8]) for i in (0, 8)])
    np.testing.assert_allclose(report.before.outputs["y"], want, rtol=1e-6)
    assert any("the last 4 eval rows" in note for note in report.notes)
    np.savez(tmp_path / "few.npz", x=x[:5])
    with pytest.raises(OptimizeError, match=r"few.npz: 5 rows; the model takes a fixed batch "
                                            r"of 8 rows"):
        optimize(source, tmp_path / "bad", OptimizeOptions(eval_data=tmp_path / "few.npz"))
    assert not (tmp_path / "bad").exists()


def fully_convolutional() -> onnx.ModelProto:
    """x [N, 3, H, W] -> 3x3 Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul: any H, W
    of 3 or more, none of 1."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["c"], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"], axis=1),
         helper.make_node("MatMul", ["f", "w"], ["y"])], "fcn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "k"),
         numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_height_and_width_take_the_golden_sample_from_the_eval_data(tmp_path):
    source = save(fully_convolutional(), tmp_path / "fcn.onnx")
    x = np.random.default_rng(1).standard_normal((6, 3, 16, 12)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="int8", eval_data=tmp_path / "eval.npz", **FAST))
    assert report.before.outputs["y"].shape == (6, 5)
    with np.load(tmp_path / "out" / "golden.npz") as golden:
        np.testing.assert_array_equal(golden["input_0"], x[:1])
    Model.load(tmp_path / "out").check_golden()
    with pytest.raises(OptimizeError, match=r"fcn.onnx: a generated input .*Pass --eval .*"
                                            r"'x' \[-1, 3, -1, -1\]"):
        optimize(source, tmp_path / "no-eval", OptimizeOptions(quantize="int8", **FAST))
    assert not (tmp_path / "no-eval").exists()


# --- corrupt array files ------------------------------------------------------------------

def corrupt_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    np.savez_compressed(folder / "good.npz", x=np.random.default_rng(0).random((500, 8)))
    data = (folder / "good.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(data[:100])
    damaged = bytearray(data)
    damaged[200:260] = b"\xff" * 60  # inside the deflated member: zlib fails on reading it
    (folder / "damaged.npz").write_bytes(bytes(damaged))
    (folder / "garbage.npy").write_bytes(b"these are not the bytes of an array")
    np.save(folder / "full.npy", np.ones((100, 8)))
    (folder / "short.npy").write_bytes((folder / "full.npy").read_bytes()[:300])
    (folder / "empty.npy").write_bytes(b"")
    np.savez(folder / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize("name, reason", [
    ("truncated", "truncated or corrupt: File is not a zip file"),
    ("damaged", "truncated or corrupt: Error -3 while decompressing"),
    ("garbage", "neither .npy nor .npz data"),
    ("short", "Failed to read all data"),
    ("empty", "truncated or corrupt"),
    ("objects", "it holds object arrays .* never loaded")])
def test_a_corrupt_array_file_is_a_typed_error_naming_it(tmp_path, name, reason):
    path = corrupt_files(tmp_path / "files")[name]
    with pytest.raises(OptimizeError, match=rf"{path.name}: not a readable \S+ file \({reason}"):
        load_arrays(path)
    with pytest.raises(InvalidInput, match=path.name):
        load_arrays(path, InvalidInput)


def test_corrupt_files_in_calibration_eval_and_predict_are_one_line_errors(tmp_path):
    files = corrupt_files(tmp_path / "files")
    source = save(cast_model(TensorProto.FLOAT), tmp_path / "m.onnx")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "0.npy", np.zeros((4, 8), np.float32))
    (calibration / "1.npy").write_bytes(files["garbage"].read_bytes())
    with pytest.raises(OptimizeError, match=r"1.npy: not a readable .npy file"):
        quantize(source, tmp_path / "q.onnx", "int8", calibration=calibration)
    with pytest.raises(OptimizeError, match=r"truncated.npz: not a readable .npz file"):
        optimize(source, tmp_path / "out", OptimizeOptions(eval_data=files["truncated"]))

    bundle = tmp_path / "bundle"
    assert edgerun("bundle", "create", str(source), "--name", "m", "--version", "1",
                   "-o", str(bundle)).returncode == 0
    for name in ("truncated", "damaged"):
        result = edgerun("predict", str(bundle), "--input", str(files[name]))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and f"{name}.npz" in result.stderr
        assert "invalid_input" in result.stderr
    result = edgerun("optimize", str(source), "--device", "x86-64", "--quantize", "int8",
                     "--calibration", str(calibration), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "1.npy" in result.stderr and not (tmp_path / "o").exists()


def test_an_npz_named_npy_is_refused_naming_both(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros(2))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npz").read_bytes())
    with pytest.raises(OptimizeError, match=r"a.npy: holds an .npz archive; .*end in .npz"):
        load_arrays(tmp_path / "a.npy")
    assert zipfile.is_zipfile(tmp_path / "a.npy")


# --- flags --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"quantize": "fp16", "per_channel": True},
     "calibration data and --per-channel apply to int8 only, not fp16"),
    ({"quantize": "fp32", "calibration": "calibration"},
     "calibration data and --per-channel apply to int8 only, not fp32"),
    ({"device": "jetson-orin", "calibration": "calibration"},  # the profile's precision: fp16
     "calibration data and --per-channel apply to int8 only, not fp16"),
    ({"quantize": "int4"}, "precision 'int4': choose one of int8, fp16, fp32"),
    ({"quantize": "int8", "calibration": "missing"}, "missing: no such folder"),
    ({"quantize": "int8", "calibration": "."}, "no .npy or .npz files in it"),
])
def test_options_that_do_not_go_together_are_refused_before_any_work(mlp_file, tmp_path,
                                                                      options, message):
    """They were refused only when quantizing, after the original had been bundled (and, with
    --prune, pruned)."""
    options = {key: tmp_path / value if key == "calibration" else value
               for key, value in options.items()}
    steps: list[str] = []
    with pytest.raises(OptimizeError, match=re.escape(message)):
        optimize(mlp_file, tmp_path / "out", OptimizeOptions(prune=0.5, **options),
                 progress=steps.append)
    assert steps == [] and not (tmp_path / "out").exists()
    if options.get("quantize") == "fp16":
        result = edgerun("optimize", str(mlp_file), "--device", "x86-64", "--quantize", "fp16",
                         "--per-channel", "-o", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "bundling" not in result.stdout and not (tmp_path / "out").exists()


def test_tvm_flags_without_compile_and_negative_trials_are_refused(tmp_path):
    source = save(cast_model(TensorProto.FLOAT), tmp_path / "m.onnx")
    ignored = edgerun("optimize", str(source), "--device", "x86-64", "--quantize", "fp32",
                      "--tune-trials", "64", "--rpc", "192.0.2.10:9090", "--force",
                      "-o", str(tmp_path / "a"))
    assert ignored.returncode == 2
    assert "--tune-trials, --rpc, --force apply to TVM compilation only: add --compile tvm" \
        in " ".join(ignored.stderr.split())
    negative = edgerun("optimize", str(source), "--device", "x86-64", "--compile", "tvm",
                       "--tune-trials", "-1", "-o", str(tmp_path / "b"))
    assert negative.returncode == 2 and "--tune-trials -1" in negative.stderr
    with pytest.raises(OptimizeError, match="tune_trials -1"):
        optimize(source, tmp_path / "c", OptimizeOptions(compile="tvm", tune_trials=-1))
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("options", [
    {"tune_trials": 64, "rpc": "192.0.2.10:9090", "force": True}, {"tune_trials": 8},
    {"force": True}])
def test_tvm_options_without_compile_are_refused_by_the_api_too(tmp_path, options):
    """The CLI refused them; OptimizeOptions took them and ignored them, writing a bundle
    that was never tuned nor compiled."""
    source = save(cast_model(TensorProto.FLOAT), tmp_path / "m.onnx")
    steps: list[str] = []
    with pytest.raises(OptimizeError) as raised:
        optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp32", **options, **FAST),
                 progress=steps.append)
    assert str(raised.value) == (f"{', '.join(options)} apply to TVM compilation only: add "
                                 'compile="tvm", or leave them out')
    assert steps == [] and not (tmp_path / "out").exists()


# --- pruning ------------------------------------------------------------------------------

def test_unstructured_pruning_zeroes_exactly_the_ratio_when_weights_tie():
    weight = np.full((8, 8), 0.125, np.float32)
    weight[0, :4] = [0.5, -0.5, 0.01, -0.02]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = prune_unstructured(model, 0.5)
    pruned = numpy_helper.to_array(model.graph.initializer[0])
    assert report.sparsity == 0.5 and np.count_nonzero(pruned == 0) == 32
    assert pruned[0, 2] == 0 and pruned[0, 3] == 0  # the smallest go first
    assert pruned[0, 0] == 0.5 and pruned[0, 1] == -0.5


# --- what the bundle holds matches what it says -------------------------------------------

@pytest.mark.parametrize("last", ["Max", "TopK"])
def test_fp16_keeps_a_float32_output_made_by_an_op_the_converter_keeps_float32(tmp_path, last):
    # the converter leaves TopK, Max, Min, CumSum, Resize... in float32 but declared their
    # graph output float16: the bundle's signature (and every client's datatype) would change
    rng = np.random.default_rng(0)
    tail = helper.make_node("Max", ["h", "zero"], ["y"]) if last == "Max" else \
        helper.make_node("TopK", ["h", "k"], ["y", "top"], axis=1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), tail], "clamp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
         numpy_helper.from_array(np.array([3], np.int64), "k")])
    source = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "clamp.onnx")
    report = optimize(source, tmp_path / "out", OptimizeOptions(quantize="fp16", **FAST))
    assert report.optimizations == ["quantize:fp16"] and report.max_abs_error < 0.05
    model = Model.load(tmp_path / "out")
    assert [s.dtype for s in model.signature.outputs] == ["float32"]
    x = rng.standard_normal((4, 8)).astype(np.float32)
    got = model.predict({"x": x})["y"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ort_run(source, x=x), rtol=1e-2, atol=1e-2)
    model.check_golden()
    model.close()


def test_int8_dynamic_that_quantizes_nothing_is_refused_not_bundled_as_int8(tmp_path):
    # ONNX Runtime's dynamic mode has no ConvTranspose: the "int8" bundle was the float model
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="upsample")], "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 10, 10])],
        [numpy_helper.from_array(rng.standard_normal((4, 6, 3, 3)).astype(np.float32), "w")])
    source = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "decoder.onnx")
    with pytest.raises(OptimizeError, match=r"decoder.onnx: int8 dynamic quantization changed "
                                            r"nothing: .*does not quantize upsample; give "
                                            r"calibration data"):
        optimize(source, tmp_path / "out", OptimizeOptions(quantize="int8", **FAST))
    assert not (tmp_path / "out").exists()
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "0.npy", rng.standard_normal((4, 4, 8, 8)).astype(np.float32))
    report = optimize(source, tmp_path / "out", OptimizeOptions(
        quantize="int8", calibration=calibration, **FAST))
    assert report.optimizations == ["quantize:int8-static-qdq"]


# --- calibration data that is wrong is refused, naming the file --------------------------

@pytest.fixture
def mlp_file(tmp_path) -> Path:
    from edgerun.examples import mlp_onnx

    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_onnx([16, 32, 8]))
    return path


def calibration_folder(folder: Path, odd: dict[str, np.ndarray]) -> Path:
    """Five good batches, and the `odd` files among them."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        np.save(folder / f"batch-{i:02d}.npy", rng.standard_normal((8, 16)).astype(np.float32))
    for name, array in odd.items():
        np.save(folder / name, array)
    return folder


def test_calibration_that_does_not_fit_names_its_file(mlp_file, tmp_path):
    folder = calibration_folder(tmp_path / "narrow",
                                {"batch-03.npy": np.zeros((8, 15), np.float32)})
    with pytest.raises(OptimizeError, match=r"narrow/batch-03.npy: input 'x': dim 1 must be 16"):
        quantize(mlp_file, tmp_path / "q.onnx", "int8", calibration=folder)
    named = tmp_path / "named"
    named.mkdir()
    np.savez(named / "a.npz", x=np.zeros((2, 16), np.float32))
    np.savez(named / "b.npz", X=np.zeros((2, 16), np.float32))
    with pytest.raises(OptimizeError, match=r"named/b.npz: calibration input has tensors "
                                            r"\['X'\], the model takes \['x'\]"):
        quantize(mlp_file, tmp_path / "q.onnx", "int8", calibration=named)


@pytest.mark.filterwarnings("ignore:All-NaN axis:RuntimeWarning")  # ONNX Runtime's, on NaN
def test_calibration_without_values_or_with_infinities_is_refused(mlp_file, tmp_path):
    # calibrated on nothing (ranges default to 1) or on an infinity (scale inf), the model
    # answered garbage and was bundled all the same
    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "0.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(OptimizeError, match=r"empty/0.npy: calibration input holds no values"):
        quantize(mlp_file, tmp_path / "q.onnx", "int8", calibration=empty)
    spoilt = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    spoilt[1, 1] = np.inf
    folder = calibration_folder(tmp_path / "inf", {"batch-02.npy": spoilt})
    with pytest.raises(OptimizeError, match=r"mlp.onnx: calibration gave no finite range to "
                                            r"tensor\(s\) 'x'.*NaN or infinite values in "
                                            r".*inf/batch-02.npy: input 'x'"):
        quantize(mlp_file, tmp_path / "q.onnx", "int8", calibration=folder)
    assert not (tmp_path / "q.onnx").exists()
    spoilt[0, 0] = np.nan  # ONNX Runtime fails on its own ("scale issue"): say why
    with pytest.raises(OptimizeError, match=r"static quantization failed: .*\(NaN or "
                                            r"infinite values in calibration feed 0 of the "
                                            r"callable: input 'x'\)"):
        quantize(mlp_file, tmp_path / "q.onnx", "int8", calibration=lambda: [{"x": spoilt}])


@pytest.mark.parametrize("options", [{"version": "v1"}, {"name": "my model"}])
def test_a_bad_name_or_version_is_refused_before_any_work(mlp_file, tmp_path, options):
    """It was refused only when the bundle was written, after pruning, quantizing and
    measuring (minutes, with TVM's tuning)."""
    steps: list[str] = []
    with pytest.raises(BundleError, match=next(iter(options))):
        optimize(mlp_file, tmp_path / "out", OptimizeOptions(quantize="int8", **options),
                 progress=steps.append)
    assert steps == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, options, cli, api", [
    (["--prune", "1.5"], {"prune": 1.5},
     "--prune 1.5: the fraction to prune lies strictly between 0 and 1",
     "prune 1.5: the fraction to prune lies strictly between 0 and 1"),
    (["--compile", "tvm", "--rpc", "192.0.2.10:9090"], {"compile": "tvm", "rpc": "192.0.2.10:9090"},
     "--rpc measures tuning candidates on the device: pass --tune-trials N too",
     "rpc measures tuning candidates on the device: pass tune_trials N too"),
    # a malformed address was refused at compile time, after the original was bundled, and
    # named --rpc when it came from the Python API's rpc=
    (["--compile", "tvm", "--tune-trials", "2", "--rpc", "pi.local"],
     {"compile": "tvm", "tune_trials": 2, "rpc": "pi.local"},
     "--rpc 'pi.local': expected HOST:PORT of a TVM RPC server, or KEY@HOST:PORT of a TVM RPC "
     "tracker and a device key",
     "rpc 'pi.local': expected HOST:PORT of a TVM RPC server, or KEY@HOST:PORT of a TVM RPC "
     "tracker and a device key"),
])
def test_a_bad_prune_ratio_or_rpc_without_trials_is_refused_before_any_work(
        tmp_path, flags, options, cli, api):
    """Both were refused only after the original had been bundled (and measured, with
    --rpc), and --rpc's error named the parameter and the flag together ("rpc / --rpc ...")."""
    source = save(cast_model(TensorProto.FLOAT), tmp_path / "m.onnx")
    result = edgerun("optimize", str(source), "--device", "x86-64", "--quantize", "fp32",
                     *flags, "-o", str(tmp_path / "a"))
    assert (result.returncode, result.stderr) == (2, f"error (optimize_error): {cli}\n")
    assert "bundling" not in result.stdout
    steps: list[str] = []
    with pytest.raises(OptimizeError) as raised:
        optimize(source, tmp_path / "b", OptimizeOptions(quantize="fp32", **options, **FAST),
                 progress=steps.append)
    assert str(raised.value) == api and steps == []
    assert not any((tmp_path / n).exists() for n in "ab")


@pytest.mark.parametrize("key", [None, "rpi4"])
def test_an_rpc_address_where_nothing_listens_is_refused_before_any_work(tmp_path, key):
    """It was refused only at compile time, after the original was bundled, quantized and
    pruned (minutes of work): a TCP probe of the server (or tracker) comes first."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"{key}@127.0.0.1:{port}" if key else f"127.0.0.1:{port}"
    if key:
        why = (f"no TVM RPC tracker answers at 127.0.0.1:{port} (Connection refused); start "
               f"one: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}")
    else:
        why = (f"no TVM RPC server answers there (Connection refused); start one on the "
               f"device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}")
    source = save(cast_model(TensorProto.FLOAT), tmp_path / "m.onnx")
    result = edgerun("optimize", str(source), "--device", "x86-64", "--quantize", "fp32",
                     "--prune", "0.5", "--compile", "tvm", "--tune-trials", "2", "--rpc",
                     address, "-o", str(tmp_path / "a"))
    assert (result.returncode, result.stderr) == (
        2, f"error (optimize_error): --rpc {address}: {why}\n")
    assert "bundling" not in result.stdout
    steps: list[str] = []
    with pytest.raises(OptimizeError) as raised:
        optimize(source, tmp_path / "b", OptimizeOptions(
            quantize="fp32", compile="tvm", tune_trials=2, rpc=address, **FAST),
            progress=steps.append)
    assert str(raised.value) == f"rpc {address}: {why}" and steps == []
    assert not any((tmp_path / n).exists() for n in "ab")
