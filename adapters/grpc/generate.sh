#!/usr/bin/env bash
# Regenerate the Python stubs of grpc_predict_v2.proto with the pinned grpcio-tools (the dev
# extra). The generated modules check at import that the protobuf and grpcio runtimes are at
# least as new as this generator, hence the floors in pyproject.toml's grpc extra.
# tests/test_grpc.py runs this into a temporary folder and fails if the committed stubs differ.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
python="${PYTHON:-$here/../../.venv/bin/python}"
[ -x "$python" ] || python=python3
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Laid out as its import path, so the service module imports the messages as
# edgerun.adapters.grpc.grpc_predict_v2_pb2, not as a top-level module.
mkdir -p "$work/edgerun/adapters/grpc"
cp "$here/grpc_predict_v2.proto" "$work/edgerun/adapters/grpc/"
"$python" -m grpc_tools.protoc -I "$work" --python_out="$work" --pyi_out="$work" \
    --grpc_python_out="$work" "$work/edgerun/adapters/grpc/grpc_predict_v2.proto"
cp "$work"/edgerun/adapters/grpc/grpc_predict_v2_pb2{.py,.pyi,_grpc.py} "$out/"
