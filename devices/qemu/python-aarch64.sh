#!/bin/sh
# The arm64 root's python3.11 under qemu-user, for processes that an emulated python starts
# (see rpc_server.py): EDGERUN_ARM64_ROOT names the root.
exec qemu-aarch64 -L "$EDGERUN_ARM64_ROOT" "$EDGERUN_ARM64_ROOT/usr/bin/python3.11" "$@"
