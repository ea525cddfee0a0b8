"""How features such as the OTA agent plug into the daemon: flags, a config table, a lifecycle.

An extension module exposes `SPEC = ExtensionSpec(...)` and is listed in `EXTENSION_MODULES`;
the daemon's command line (and the one-file binary, which bundles every listed module) adds its
flags, and at start-up `create` gets the daemon, the parsed flags and the module's
`[<name>]` table from device.toml, and returns the extension to run (or None to stay off).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edgerun.adapters.mqtt.daemon import Daemon

#: Modules holding a `SPEC`; e.g. "edgerun.adapters.ota.agent".
EXTENSION_MODULES: tuple[str, ...] = ("edgerun.adapters.ota.daemon",)


class Extension(Protocol):
    """Runs inside the daemon; both methods are called from the daemon's main loop thread."""

    def start(self) -> None:
        """Called once the repository is loaded, just before the daemon connects."""

    def stop(self) -> None:
        """Called at shutdown, after in-flight requests were answered."""


@dataclass(frozen=True)
class ExtensionSpec:
    #: Its table in device.toml (`[ota]`) and the prefix its flags should use.
    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    create: Callable[["Daemon", argparse.Namespace, dict[str, Any]], "Extension | None"]
    #: Keys of its table that hold paths (one or a list): relative ones are relative to
    #: device.toml's folder, as the top-level settings' are.
    paths: tuple[str, ...] = ()
    #: Every key its table takes: any other ends start-up, as an unknown top-level key does
    #: (`trusted = ...` for `trust` left the OTA agent off without a word).
    keys: tuple[str, ...] = ()
    #: The longest its extension's `stop` may take: a stopping daemon tells systemd its total.
    stop_wait_s: float = 0.0


def specs() -> list[ExtensionSpec]:
    return [importlib.import_module(module).SPEC for module in EXTENSION_MODULES]
