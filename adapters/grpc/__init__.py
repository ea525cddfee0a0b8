"""Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`) on the data plane.

`server.start(plane, host, port)` serves it with grpc.aio on the running event loop (beside
uvicorn in `edgerun serve --grpc-port`); `codec` translates the protocol's messages; the
`grpc_predict_v2_pb2*` modules are generated from `grpc_predict_v2.proto` by `generate.sh`.
The protocol's protobuf package is `inference`, as in KServe's SDK and tritonclient: a process
can import only one of them, since protobuf's default pool holds each message name once.
"""
