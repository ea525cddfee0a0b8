"""Graph edits that more than one optimizer needs before it changes a model."""

from __future__ import annotations

import onnx


def weights_not_inputs(model: onnx.ModelProto) -> None:
    """Initializers that are also graph inputs (IR 3 required it; older exporters and the ONNX
    model zoo's CNNs still do it) become plain initializers, in place: fp16 conversion retypes
    such a weight and structured pruning reshapes it, but the input that declares it keeps the
    old type and shape, a model ONNX Runtime refuses to load. No caller could feed them: a
    bundle's signature (ONNX Runtime's inputs) never lists them."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    if len(inputs) == len(model.graph.input):
        return
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # from IR 4 on, initializers need no input
