"""`edgerun serve` as a platform team extends it: a token-auth hook, and a model that loads late.

    python -m tests.grpc_hooked_server REPO --port P --grpc-port G --log-level warning

The hook refuses gRPC calls without `authorization: Bearer good` (UNAUTHENTICATED) or with
another token (PERMISSION_DENIED); HTTP stays open so the test harness can poll readiness.
Model "slow" stays LOADING until the file REPO/../slow.go exists; any other model's version V
stays LOADING while the file REPO/../NAME-V.hold exists.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgerun.adapters.dataplane import Call, Hook
from edgerun.adapters.http.server import serve
from edgerun.runtime.errors import PermissionDenied, Unauthenticated
from edgerun.runtime.sources import FolderSource, folder_fingerprint


class TokenAuth(Hook):
    def before(self, call: Call) -> None:
        if call.transport != "grpc":
            return
        token = call.attributes("authorization")
        if token is None:
            raise Unauthenticated(f"{call.route}: no authorization metadata")
        if token != "Bearer good":
            raise PermissionDenied(f"{call.route}: this token may not call the server")


class GatedSource(FolderSource):
    def fingerprint(self, name: str, version: str) -> tuple:
        return folder_fingerprint(self.root / name / version)

    def bundle_path(self, name: str, version: str) -> Path:
        gate = self.root.parent / "slow.go"
        while name == "slow" and not gate.exists():
            time.sleep(0.05)
        while (self.root.parent / f"{name}-{version}.hold").exists():
            time.sleep(0.05)
        return super().bundle_path(name, version)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repository", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    serve(GatedSource(args.repository), port=args.port, grpc_port=args.grpc_port,
          log_level=args.log_level, hooks=[TokenAuth()])


if __name__ == "__main__":
    main()
