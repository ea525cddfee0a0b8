"""Fleet OTA: roll a 5 MB bundle out to 50 simulated devices on a loopback Mosquitto.

Each device is a real OTA agent, repository and data plane in a thread, with its own data
folder and paho connection (tests/fleet_sim.py); the registry and orchestrator are a real
`edgerun fleet serve` process. A steady request load runs on every device throughout. The
baseline, measured in the same run, is the transfer floor: the same 50 downloads of the same
archive from the same registry with nothing else (urllib, 8 at a time).

    python benchmarks/ota.py [--devices 50] [--write]

`--write` records the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from common import machine, markdown_table, record  # noqa: E402

from edgerun.examples import mlp_onnx  # noqa: E402
from edgerun.runtime import signing  # noqa: E402
from tests.cli import edgerun  # noqa: E402
from tests.fleet_sim import (FleetServer, SimDevice, SteadyLoad, infer_body,  # noqa: E402
                             make_bundle, running_broker, wait_for)

LAYERS = [256, 1024, 1024, 10]  # about 5.3 MB of fp32 weights


def transfer_floor(url: str, count: int) -> float:
    def fetch(_: int) -> int:
        with urllib.request.urlopen(url) as response:
            return len(response.read())
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, range(count)))
    return time.perf_counter() - start


def rollout(server: FleetServer, devices: list[SimDevice], version: str, **spec) -> dict:
    body = infer_body(LAYERS[0])
    before = sum(d.agent.bytes_downloaded for d in devices)
    with SteadyLoad(devices, body, threads=4, pause=0.001) as load:
        time.sleep(1.0)
        served_before = load.total
        start = time.perf_counter()
        status = server.deploy(model="m", version=version, group="fleet", **spec)
        status = server.wait_rollout(status["id"], timeout=600)
        seconds = time.perf_counter() - start
        time.sleep(1.0)
    return {"seconds": seconds, "state": status["state"], "counts": status["counts"],
            "bytes": sum(d.agent.bytes_downloaded for d in devices) - before,
            "requests": load.total - served_before, "failed": len(load.failures),
            "served": sorted({tuple(d.served("m")) for d in devices})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="edgerun-ota-bench-"))
    key, pub = signing.generate_keys(scratch / "keys")
    trusted = [signing.load_public_key(pub)]
    bundles = {v: make_bundle(scratch / "bundles", mlp_onnx(LAYERS, seed=int(v)), "m", v, key)
               for v in ("1", "2", "3")}
    with running_broker(scratch / "broker") as broker:
        server = FleetServer(scratch / "fleet", broker, [pub]).start()
        devices: list[SimDevice] = []
        try:
            for v in ("2", "3"):
                result = edgerun("fleet", "push", str(bundles[v]), "--server", server.url)
                assert result.returncode == 0, result.stderr
            size = server.get("/bundles")[0]["size"]
            print(f"starting {args.devices} devices with version 1 ...", flush=True)
            devices = [SimDevice(f"dev{i:03d}", scratch / f"dev{i:03d}", broker, trusted,
                                 bundles["1"], telemetry_s=0.5).start()
                       for i in range(args.devices)]
            wait_for(lambda: len(server.get("/devices")) == args.devices, 60, "devices")
            floor = transfer_floor(f"{server.url}/bundles/m/2", args.devices)
            print(f"transfer floor {floor:.2f} s; one wave ...", flush=True)
            one = rollout(server, devices, "2")
            print(f"one wave {one}; three waves with a gate ...", flush=True)
            gated = rollout(server, devices, "3", waves=[0.05, 0.25, 1.0],
                            gate="p99<200ms,errors<1%")
            print(f"three waves {gated}", flush=True)
        finally:
            for device in devices:
                device.close()
            server.stop()
    expected = size * args.devices
    rows = [["transfer floor: the same downloads alone (8 at a time)", f"{floor:.2f}", "1.00",
             f"{expected / 1e6:.1f}", "", "", ""]]
    for label, run in (("rollout, one wave (100%)", one),
                       ("rollout, waves 5%,25%,100%, gate p99<200ms,errors<1%", gated)):
        rows.append([f"{label}: {run['state']}, {run['counts']}", f"{run['seconds']:.2f}",
                     f"{run['seconds'] / floor:.1f}x", f"{run['bytes'] / 1e6:.1f}",
                     f"{run['requests']:,}", str(run["failed"]),
                     "met" if run["failed"] == 0 and run["state"] == "completed" else "MISSED"])
    table = markdown_table(["what", "seconds", "vs floor", "MB sent", "requests during",
                            "failed requests (target 0)", ""], rows)
    text = (f"Command: `python benchmarks/ota.py --write`  \n"
            f"Machine: {machine()}, paho-mqtt {version('paho-mqtt')}, "
            f"{Path('/usr/sbin/mosquitto').exists() and 'mosquitto 2.0'}\n\n"
            f"{args.devices} simulated devices (agents in threads, each with its own data "
            f"folder, repository and MQTT connection) on a loopback Mosquitto; MLP "
            f"{'-'.join(map(str, LAYERS))} bundle of {size / 1e6:.2f} MB (.tar.gz); 4 threads "
            f"send requests round-robin to every device throughout. Time is from the deploy "
            f"call until every device reported active.\n\n{table}\n\n"
            "Every device downloads, unpacks, checks every hash and the signature, loads the new "
            "version beside the old one and runs its golden sample before the swap; 50 of those "
            "on 2 shared cores, beside the request load, are what the rollout spends beyond the "
            "transfer floor. MB sent is what the agents received: 50 whole archives, nothing "
            "resent.")
    print(text)
    if args.write:
        record("ota", text)


if __name__ == "__main__":
    main()
