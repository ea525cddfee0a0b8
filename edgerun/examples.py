"""Small real models, built here rather than downloaded: for the demo, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mlp_onnx(sizes: Sequence[int], *, seed: int = 0) -> bytes:
    """An MLP (Gemm + Relu layers) with a dynamic batch axis, as serialized ONNX."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        previous = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgerun.examples")
    model.ir_version = 8
    return model.SerializeToString()


def digits_split(*, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (8x8 images scaled to [0, 1], float32 [n, 64]) split into
    1,400 training and 397 held-out rows: train images, train labels, test images, test labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("the digits data needs scikit-learn: pip install "
                                  "'edgerun[demo]'", name=exc.name) from exc
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def digits_classifier_onnx(*, seed: int = 0, hidden: Sequence[int] = (128,),
                           alpha: float = 1e-4) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An MLP trained on scikit-learn's bundled digits (8x8 images), converted with skl2onnx.

    `hidden` are the hidden layer widths, `alpha` the L2 penalty. Returns the ONNX bytes and the
    held-out images (float32 [n, 64]) and labels.
    """
    try:
        from skl2onnx import to_onnx
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("the digits model needs scikit-learn and skl2onnx: "
                                  "pip install 'edgerun[demo]'", name=exc.name) from exc
    train_x, train_y, test_x, test_y = digits_split(seed=seed)
    classifier = MLPClassifier(hidden_layer_sizes=tuple(hidden), alpha=alpha, max_iter=400,
                               random_state=seed)
    # one BLAS thread: on these small matrices more threads only spin, and on a busy machine
    # they made training 5x slower (11 s against 61 s, load average 12 on 2 cores)
    with threadpool_limits(limits=1):
        classifier.fit(train_x, train_y)
    onnx_model = to_onnx(classifier, train_x[:1], options={"zipmap": False},
                         target_opset=17)
    return onnx_model.SerializeToString(), test_x, test_y
