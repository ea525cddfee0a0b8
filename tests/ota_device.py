"""A device as its own process, for kill -9 tests: repository, OTA agent, paho client.

After `recover()` it publishes a retained status naming the versions it serves and whether
the served model still reproduces its golden sample, then takes jobs from its OTA topic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgerun.adapters.ota.agent import OtaAgent
from edgerun.runtime import signing
from edgerun.runtime.errors import EdgerunError
from edgerun.runtime.repository import Repository
from tests.fleet_sim import PROFILE, mqtt_client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--trust", type=Path, required=True)
    args = parser.parse_args()
    repository = Repository(args.models, PROFILE)
    client = mqtt_client(args.device_id)
    agent = OtaAgent(publish=client.publish, repository=repository, device_id=args.device_id,
                     data_dir=args.data, trusted=[signing.load_public_key(args.trust)])
    agent.recover()
    repository.load_all()
    try:
        served = repository.get("m")
        served.model.check_golden()
        status = {"served": repository.versions("m"), "golden": "ok"}
    except EdgerunError as exc:
        status = {"served": [], "golden": str(exc)}

    def on_connect(client, userdata, flags, reason, properties=None) -> None:
        client.publish(f"edgerun/{args.device_id}/status", json.dumps(
            {"state": "online", "pid_status": status}), qos=1, retain=True).wait_for_publish(5)
        client.subscribe(agent.topic, qos=1)

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: agent.handle_job(m.payload)
    client.connect("127.0.0.1", args.port)
    client.loop_forever()


if __name__ == "__main__":
    main()
