"""TVM's RPC server (`python -m tvm.exec.rpc_server`) in the arm64 root, under qemu-user.

`qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11 rpc_server.py ROOT [rpc_server options]` serves
as an emulated aarch64 board for MetaSchedule tuning over RPC. The server starts its worker as
`sys.executable -m tvm.exec.popen_worker`; without binfmt_misc the host kernel cannot exec an
aarch64 binary ("Exec format error"), so sys.executable is pointed at python-aarch64.sh, a
shell script the kernel runs natively and which starts the worker under qemu. Each session is
then a fork of that worker, which qemu-user handles as it is.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main(root: str, options: list[str]) -> None:
    sys.path.insert(0, "/opt/edgerun-py")
    os.environ["EDGERUN_ARM64_ROOT"] = root
    os.environ["PYTHONPATH"] = "/opt/edgerun-py"
    sys.executable = str(Path(__file__).resolve().with_name("python-aarch64.sh"))
    sys.argv = ["tvm.exec.rpc_server", *options]
    runpy.run_module("tvm.exec.rpc_server", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
