#!/usr/bin/env bash
# Build an arm64 Debian root with python3.11, numpy and apache-tvm, to run aarch64 TVM
# artifacts on an x86 host under `qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11`.
#
# No chroot and no binfmt_misc are needed: debootstrap's first stage fetches and unpacks the
# base system, the debs it downloaded for python3 are unpacked with dpkg-deb, and the aarch64
# wheels are installed into ROOT/opt/edgerun-py by the host's pip (--platform), so nothing
# runs under emulation while building. Usage: make-arm64-root.sh ROOT [PYTHON]
set -euo pipefail
root=${1:?usage: make-arm64-root.sh ROOT [PYTHON]}
python=${2:-python3}
mirror=${EDGERUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# the same pins as the `tvm` extra: apache-tvm-ffi 0.1.15 crashes MetaSchedule (see README);
# cloudpickle: TVM's RPC server (rpc_server.py) sends its start-up to a worker with it
wheels=("apache-tvm==0.27.0.post1" "apache-tvm-ffi==0.1.14.post0" numpy ml_dtypes
        typing-extensions psutil cloudpickle)

install_wheels() {
  "$python" -m pip install --quiet --no-deps --no-compile --upgrade --target "$1/opt/edgerun-py" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --only-binary=:all: "${wheels[@]}"
  printf '%s\n' "${wheels[@]}" >"$1/.edgerun-ready"
}

if [[ -x "$root/usr/bin/python3.11" && -f "$root/.edgerun-ready" ]]; then
  # a root cached by an earlier checkout gets the wheels this one lists
  [[ "$(cat "$root/.edgerun-ready")" == "$(printf '%s\n' "${wheels[@]}")" ]] || install_wheels "$root"
  exit 0
fi
for tool in debootstrap qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "make-arm64-root: $tool is missing (apt-get install debootstrap qemu-user)" >&2; exit 1; }
done
partial="$root.partial"
rm -rf "$partial"
mkdir -p "$partial"
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6 \
  bookworm "$partial" "$mirror" >"$partial.log" 2>&1 || { tail -n 20 "$partial.log" >&2; exit 1; }
# --foreign leaves the included packages downloaded but not unpacked: unpack them all
for deb in "$partial"/var/cache/apt/archives/*.deb; do
  dpkg-deb -x "$deb" "$partial"
done
rm -f "$partial"/var/cache/apt/archives/*.deb
install_wheels "$partial"
rm -rf "$root" && mv "$partial" "$root" && rm -f "$partial.log"
