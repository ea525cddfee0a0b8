"""Wire formats <-> `dict[str, np.ndarray]`, for every transport; no web framework here.

- `oip`: Open Inference Protocol v2 JSON and its binary tensor data extension.
- `tfserving`: TF Serving REST predict (row and column formats).
- `npz`: numpy's `.npz` archive, a compact binary form for MQTT and queues.
- `prometheus`: the core's metrics in the Prometheus text format.
"""
