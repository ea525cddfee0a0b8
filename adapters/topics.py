"""What a device id or group may be: one whole MQTT topic level, for the daemon that
subscribes under it and the fleet that sends it jobs alike."""

from __future__ import annotations

import re

#: What Mosquitto refuses in a topic (a client that sends one is dropped as malformed: NUL,
#: C0 and C1 controls, surrogates, Unicode non-characters) and what splits or widens one.
_NOT_IN_SEGMENT = re.compile("[/+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef]")
#: MQTT's limit on a topic's length in bytes, less the longest topic a device id goes into.
_MAX_SEGMENT = 65535 - len("edgerun//ota/report")


def topic_segment(name: str) -> bool:
    """Whether `name` can be a device id: one whole topic level that the broker accepts."""
    return bool(name) and not _NOT_IN_SEGMENT.search(name) \
        and not any(ord(c) & 0xFFFE == 0xFFFE for c in name) \
        and len(name.encode()) <= _MAX_SEGMENT
