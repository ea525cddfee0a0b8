"""The one-file device binary's entry point: the MQTT daemon and nothing else of edgerun."""

import sys

from edgerun.adapters.mqtt.cli import main

if __name__ == "__main__":
    sys.exit(main())
