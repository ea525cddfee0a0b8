"""The OTA wire: topics, job and report messages shared by the fleet and the device agent.

Jobs go to `edgerun/<device>/ota` with QoS 1, retained, so a device that was offline gets the
latest one when it returns (an empty retained payload clears it). The agent answers on
`edgerun/<device>/ota/report`, retained too, so an orchestrator that restarts reads every
device's latest state as soon as it subscribes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from edgerun.runtime.bundle import NAME_RE, VERSION_RE
from edgerun.runtime.errors import InvalidInput

INSTALL, ROLLBACK = "install", "rollback"
# a job's states, in order; the last three end it
QUEUED, DOWNLOADING, VERIFYING, STAGED = "queued", "downloading", "verifying", "staged"
ACTIVE, FAILED, ROLLED_BACK = "active", "failed", "rolled_back"
STATES = (QUEUED, DOWNLOADING, VERIFYING, STAGED, ACTIVE, FAILED, ROLLED_BACK)
TERMINAL = frozenset({ACTIVE, FAILED, ROLLED_BACK})
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A report's fields that may be null: no version before the job, none serving after it.
_MAY_BE_NONE = frozenset({"previous", "active"})
#: The deepest nesting a device or fleet message may have; real ones are a few levels deep.
MAX_DEPTH = 32


def decode_json(payload: bytes | str) -> Any:
    """A message's JSON; ValueError if it is none, or nests deeper than MAX_DEPTH. Python
    parses JSON recursively, so how deep it can go depends on the stack of whoever reads it:
    telemetry a device nested ~990 deep was parsed and stored by the orchestrator's MQTT
    thread, then failed every later read of the devices (GET /devices, every gated rollout's
    tick) as a RecursionError; nested deeper, it was an untyped RecursionError at once."""
    try:
        data = json.loads(payload)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
            stack.extend((item, depth + 1)
                         for item in (value.values() if isinstance(value, dict) else value))
    return data


def job_topic(device_id: str) -> str:
    return f"edgerun/{device_id}/ota"


def report_topic(device_id: str) -> str:
    return f"edgerun/{device_id}/ota/report"


@dataclass(frozen=True)
class Job:
    job_id: str
    kind: str  # install | rollback
    model: str
    version: str  # in a rollback, "" is no version: the device served none before (removed)
    url: str = ""
    sha256: str = ""
    size: int = 0
    rollout: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Job:
        """InvalidInput for anything but a job the agent may act on: jobs are not signed, and
        every field ends up in a path, a header or a request on the device."""
        try:
            data = decode_json(payload)
            job = cls(job_id=data["job_id"], kind=str(data["kind"]),
                      model=str(data["model"]), version=str(data["version"]),
                      url=data.get("url", ""), sha256=data.get("sha256", ""),
                      size=data.get("size", 0), rollout=str(data.get("rollout", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"OTA job is malformed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(job.job_id, str) or not job.job_id:
            raise InvalidInput(f"OTA job id {job.job_id!r:.40} is not a string")
        if job.kind not in (INSTALL, ROLLBACK):
            raise InvalidInput(f"OTA job kind {job.kind!r} is not install or rollback")
        if job.kind == INSTALL and not (job.url and job.sha256):
            raise InvalidInput("OTA install job needs a url and a sha256")
        # both become parts of paths on the device: "../x" must never leave the OTA folder
        no_version = job.kind == ROLLBACK and job.version == ""
        if not NAME_RE.fullmatch(job.model) or not (
                no_version or VERSION_RE.fullmatch(job.version)):
            raise InvalidInput(f"OTA job names model {job.model[:80]!r} version "
                               f"{job.version[:40]!r}, which is not a bundle name and version")
        # a download's: the hash names its file and goes in its If-Range header
        if job.url or job.sha256:
            if not isinstance(job.url, str) or urlsplit(job.url).scheme not in ("http", "https"):
                raise InvalidInput(f"OTA job url {job.url!r:.80} is not an http(s) URL")
            if not isinstance(job.sha256, str) or not _SHA256.fullmatch(job.sha256):
                raise InvalidInput(f"OTA job sha256 {job.sha256!r:.80} is not 64 hex digits")
        if type(job.size) is not int or job.size < 0:
            raise InvalidInput(f"OTA job size {job.size!r:.40} is not a number of bytes")
        return job


@dataclass(frozen=True)
class Report:
    job_id: str
    device: str
    state: str
    model: str
    version: str
    previous: str | None = None  # the version active before this job (for rollback)
    active: str | None = None    # the version serving now
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Report:
        """ValueError for anything but a JSON object of strings: a device may publish whatever
        it likes, and a job id that was a table or a list reached the fleet's database lookup
        (a binding error, logged with a traceback)."""
        data = decode_json(payload)
        if not isinstance(data, dict):
            raise ValueError("an OTA report must be a JSON object")
        for key in ("job_id", "device", "state", "model", "version", "previous", "active"):
            value = data.get(key)
            if not isinstance(value, str) and (value is not None or key not in _MAY_BE_NONE):
                raise ValueError(f"{key} {value!r:.40} of an OTA report is not a string")
        return cls(**{k: data.get(k) for k in ("job_id", "device", "state", "model",
                                                 "version", "previous", "active")},
                   detail=str(data.get("detail", "")), extra=dict(data.get("extra") or {}))
