"""A/B slots on disk, and the VersionSource that serves whichever slot is active.

    DATA/ota/<model>/state.json   {"active": "a", "slots": {"a": "3", "b": "2"}, "last": {...}}
    DATA/ota/<model>/a/           a verified bundle folder
    DATA/ota/<model>/b/           the previous one, kept for rollback
    DATA/ota/<model>/.staging-*   an update being unpacked and verified (removed at start-up)

`state.json` is the only pointer: it is replaced with write, fsync, rename and a fsync of the
folder, so after a power cut it names either the old slot or the new one, and it only ever
names a slot whose bundle was verified before it was renamed into place. A model with no slot
active is served from the fallback source (the daemon's repository folder), if it has it.
`"switching"` names the job whose switch flipped the pointer (and the version before it) until
that job reports its end, so a job replayed after a power cut in between is answered right.
A `state.json` that cannot be read (an SD card that lost a write in a power cut), or is JSON
of another shape, is rebuilt from the slots' manifests, the older version active: recovery
verifies and smoke-tests it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgerun.adapters.ota.messages import Report
from edgerun.runtime.bundle import NAME_RE, Bundle, read_manifest, version_key
from edgerun.runtime.errors import BundleError, ModelNotFound
from edgerun.runtime.model_config import ModelConfig
from edgerun.runtime.signing import PublicKey, verify_folder
from edgerun.runtime.sources import VersionSource, folder_fingerprint

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SLOTS = ("a", "b")


@dataclass
class SlotState:
    active: str | None = None                      # "a", "b", or None (fallback serves)
    slots: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(SLOTS))
    last: dict[str, Any] = field(default_factory=dict)  # the last job's final report
    #: {"job_id", "previous"} of the job whose switch flipped the pointer, until it reports its
    #: end: a job replayed after a power cut in between is answered with its true previous
    switching: dict[str, Any] = field(default_factory=dict)

    @property
    def active_version(self) -> str | None:
        return self.slots.get(self.active) if self.active else None

    @property
    def inactive(self) -> str:
        return "b" if self.active == "a" else "a"

    def step_back(self) -> None:
        """Drop the active slot: the other serves if it holds a version, else the fallback."""
        other = self.inactive
        if self.active is not None:
            self.slots[self.active] = None
        self.active = other if self.slots.get(other) else None

    def slot_of(self, version: str) -> str | None:
        return next((s for s in SLOTS if self.slots.get(s) == version), None)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_shape(data: Any) -> None:
    """ValueError unless `data` is a state file as `SlotStore.write` makes it: JSON of another
    shape (a flipped bit, a hand edit) is as unusable as a torn file, and is rebuilt too."""
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    slots = data.get("slots", {})
    if not isinstance(slots, dict):
        raise ValueError(f"slots is a JSON {type(slots).__name__}, not an object")
    for slot in SLOTS:
        if not isinstance(slots.get(slot), (str, type(None))):
            raise ValueError(f"slot {slot} holds {slots[slot]!r:.40}, not a version")
    if data.get("active") not in (None, *SLOTS):
        raise ValueError(f"active slot {data['active']!r:.40} is not a or b")
    for key in ("last", "switching"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"{key} is a JSON {type(data[key]).__name__}, not an object")
    if data.get("last"):
        try:
            Report(**data["last"])  # what recovery publishes again
        except TypeError as exc:
            raise ValueError(f"last is not a job's report: {exc}") from None


class SlotStore:
    """The slot folders and state files of every model under `DATA/ota`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, model: str, slot: str | None = None) -> Path:
        return self.root / model if slot is None else self.root / model / slot

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / STATE_FILE).is_file())

    def read(self, model: str) -> SlotState:
        path = self.folder(model) / STATE_FILE
        try:
            data = json.loads(path.read_bytes())
            _check_shape(data)
        except FileNotFoundError:
            return SlotState()
        except (OSError, ValueError) as exc:  # torn, zeroed, a bad block: not a dead daemon
            return self._rebuilt(model, exc)
        slots = {s: data.get("slots", {}).get(s) for s in SLOTS}
        return SlotState(data.get("active"), slots, dict(data.get("last") or {}),
                         dict(data.get("switching") or {}))

    def _rebuilt(self, model: str, error: Exception) -> SlotState:
        """The pointer again from the slots' own manifests: the older version serves (what
        served before an update the pointer broke in; what a rollback went back to), and a
        job delivered again goes on from there. Nothing here is verified: recovery is, and
        SlotSource checks the signature of whatever it loads."""
        slots: dict[str, str | None] = dict.fromkeys(SLOTS)
        for slot in SLOTS:
            try:
                manifest = read_manifest(self.folder(model, slot))
            except (BundleError, OSError):
                continue
            if manifest.name == model:
                slots[slot] = manifest.version
        held = [s for s in SLOTS if slots[s]]
        active = min(held, key=lambda s: version_key(slots[s]), default=None)
        log.error("%s is unreadable (%s); rebuilt from the slots: %s active",
                  self.folder(model) / STATE_FILE, error,
                  f"version {slots[active]}" if active else "no slot")
        return SlotState(active, slots)

    def write(self, model: str, state: SlotState) -> None:
        """Replace the state file atomically and durably."""
        folder = self.folder(model)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{STATE_FILE}.tmp"
        data = json.dumps({"active": state.active, "slots": state.slots, "last": state.last,
                           "switching": state.switching})
        with open(temporary, "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / STATE_FILE)
        fsync_dir(folder)


class SlotSource:
    """VersionSource: a model's active slot where it has one, else the fallback source.

    A slot's bundle is checked against the `trusted` keys each time it loads, on the bundle
    that then serves: staging checked it once, and a slot changed since (by whoever can write
    the data folder) must not serve unsigned. The fallback folder is the device owner's own.
    """

    def __init__(self, store: SlotStore, fallback: VersionSource | None = None,
                 trusted: Iterable[PublicKey] = ()) -> None:
        self.store = store
        self.fallback = fallback
        self.trusted = list(trusted)

    def check(self, bundle: Bundle) -> None:
        if self.trusted and bundle.path.resolve().is_relative_to(self.store.root.resolve()):
            verify_folder(bundle, self.trusted)

    def __repr__(self) -> str:
        return f"SlotSource({str(self.store.root)!r}, fallback={self.fallback!r})"

    def _managed(self, name: str) -> SlotState | None:
        if not NAME_RE.fullmatch(name):
            return None
        state = self.store.read(name)
        return state if state.active_version else None

    def models(self) -> list[str]:
        managed = {m for m in self.store.models() if self._managed(m)}
        return sorted(managed | set(self.fallback.models() if self.fallback else ()))

    def config(self, name: str) -> ModelConfig:
        """The model's config.toml in the daemon's folder (batching, instances) where it has
        one, whichever of slot or folder serves it; else the folder's defaults."""
        if self.fallback is not None:
            try:
                return self.fallback.config(name)
            except ModelNotFound:
                pass
        if self._managed(name):
            return ModelConfig.load(self.store.folder(name),
                                    getattr(self.fallback, "default_batching", None))
        raise ModelNotFound(f"model {name!r} has no active OTA slot")

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        state = self._managed(name)
        if state is not None:
            return [state.active_version]
        return self.fallback.wanted(name, config) if self.fallback else []

    def bundle_path(self, name: str, version: str) -> Path:
        state = self.store.read(name)
        slot = state.slot_of(version)
        if slot is not None:
            return self.store.folder(name, slot)
        if self.fallback is not None:
            return self.fallback.bundle_path(name, version)
        raise ModelNotFound(f"model {name!r} has no slot holding version {version}")

    def fingerprint(self, name: str, version: str) -> tuple:
        return folder_fingerprint(self.bundle_path(name, version))
