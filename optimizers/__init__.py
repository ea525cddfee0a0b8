"""The offline stage: quantize, prune and compile a model for a device profile into a bundle.

Each step is its own module, imported when used: `quantize` (int8 dynamic/static QDQ, fp16),
`fp16` (what float16 cannot hold, kept float32), `prune` (magnitude and structured),
`onnx_graph` (graph edits those steps share), `pipeline` (the `edgerun optimize` flow,
measured).
"""

from edgerun.optimizers.errors import OptimizeError

__all__ = ["OptimizeError"]
