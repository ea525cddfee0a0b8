"""The MQTT edge daemon: a device's model repository served over a broker.

`edgerun daemon --repository DIR --broker mqtt://HOST:PORT --device-id ID [--group G]` (or
`--config device.toml`). Requests arrive on `edgerun/<ID>/infer/<model>[/<version>]` and on the
shared subscription `$share/<G>/edgerun/<G>/infer/<model>`; the answer goes to the request's
Response Topic with its Correlation Data (MQTT v5), or to the `"reply_to"` topic in the JSON
payload (MQTT 3.1.1). Payload forms and errors: see `messages`. The device publishes a retained
`edgerun/<ID>/status` (`"state": "online"`/`"offline"`, also its Last Will) and
`edgerun/<ID>/telemetry` every `--telemetry-interval` seconds.

Extension point (the OTA agent and whatever comes next): an extension module exposes
`SPEC = ExtensionSpec(name, add_arguments, create, keys=(...))` and is listed in
`extensions.EXTENSION_MODULES`. `add_arguments(parser)` adds its flags to `edgerun daemon` and
the device binary; `create(daemon, args, table)` gets the `Daemon`, the parsed flags and its
`[name]` table from device.toml (holding only the `keys` it declared: any other ends start-up),
and returns an object with `start()` (repository loaded, not yet connected) and `stop()` (after
the drain), or None. Through the `Daemon` it may use:

- `daemon.subscribe(topic_filter, callback, qos=None)`: `callback(message)` (a paho
  `MQTTMessage`: `.topic`, `.payload`, `.properties`, `.retain`) runs on the daemon's extension
  thread, one message at a time in arrival order, never on paho's network thread; subscriptions
  are renewed on every reconnect.
- `daemon.publish(topic, payload, qos=1, retain=False, properties=None)`: bytes, str, or a
  dict/list sent as JSON; QoS > 0 messages wait for the connection to come back.
- `daemon.add_status_fields(fn)` / `daemon.add_telemetry_fields(fn)`: `fn()` returns a dict merged
  into every status (online and the Last Will) / telemetry payload; `daemon.publish_status()`
  re-publishes the retained status now.
- `daemon.repository` (hot swap: `load(name)`), `daemon.plane`, `daemon.device_id`,
  `daemon.group`, `daemon.data_dir` (created at start), `daemon.config` (`DaemonConfig`).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"Daemon": "daemon", "DaemonConfig": "config", "load_config": "config",
            "Extension": "extensions", "ExtensionSpec": "extensions"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `edgerun --help` builds the daemon's flags without importing paho or the core.
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
