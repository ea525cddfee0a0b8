"""`edgerun build daemon`: a one-file PyInstaller executable of the MQTT daemon, plus its
systemd unit and a sample device.toml, for one device profile.

PyInstaller does not cross-compile: the binary is for the machine (and CPU architecture) that
builds it; devices/README.md says how aarch64 builds are made.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgerun.devices.profile import PROFILE_DIR, DeviceProfile, load_profile

RECIPES = Path(__file__).with_name("daemon")
BINARY = "edgerun-daemon"
#: What the daemon never imports; excluded so PyInstaller's analysis does not drag them in.
EXCLUDES = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "sklearn",
            "skl2onnx", "onnx", "scipy", "sympy", "matplotlib", "pandas", "tkinter", "IPython",
            "pytest", "hypothesis", "tritonclient", "httpx", "rich", "PIL",
            "onnxruntime.transformers", "onnxruntime.quantization", "onnxruntime.tools",
            "edgerun.adapters.http", "edgerun.optimizers", "edgerun.cli", "edgerun.examples")
#: Backends are imported by name at run time, which PyInstaller cannot see.
BACKENDS = {"onnxruntime": "edgerun.runtime.backends.onnxruntime"}
ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
#: The daemon without a model: about 80 MB idle (benchmarks/README.md, MQTT), with headroom.
DAEMON_MEMORY_MB = 256


@dataclass(frozen=True)
class DaemonBuild:
    binary: Path
    unit: Path
    config: Path


def host_arch() -> str:
    machine = platform.machine().lower()
    return ARCH_ALIASES.get(machine, machine)


def build_daemon(profile_name: str, output: Path, *, work: Path | None = None,
                 backends: tuple[str, ...] = ("onnxruntime",)) -> DaemonBuild:
    """Build `output/edgerun-daemon` (+ unit and device.toml) for the named device profile."""
    from edgerun.adapters.mqtt.extensions import EXTENSION_MODULES

    profile = load_profile(profile_name)
    if profile.arch not in ("any", host_arch()):
        raise ValueError(f"profile {profile.name!r} is for {profile.arch} but this machine is "
                         f"{host_arch()}; PyInstaller does not cross-compile: build on the "
                         "device or in an arm64 container (see devices/README.md)")
    output.mkdir(parents=True, exist_ok=True)
    work = work or output / ".build"
    source = _stage_sources(work / "src")
    command = [sys.executable, "-m", "PyInstaller", "--onefile", "--noconfirm",
               "--log-level", "WARN", "--name", BINARY, "--distpath", str(output),
               "--workpath", str(work), "--specpath", str(work), "--paths", str(source),
               "--add-data", f"{PROFILE_DIR}{_SEP}edgerun/devices/profiles"]
    for module in (*(BACKENDS[b] for b in backends), *EXTENSION_MODULES):
        command += ["--hidden-import", module]
    for module in EXCLUDES:
        command += ["--exclude-module", module]
    command.append(str(RECIPES / "entry.py"))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"PyInstaller failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    unit = output / "edgerun-daemon.service"
    unit.write_text(systemd_unit(profile))
    config = output / "device.toml"
    config.write_text((RECIPES / "device.toml").read_text().replace("@PROFILE@", profile.name))
    return DaemonBuild(output / BINARY, unit, config)


def systemd_unit(profile: DeviceProfile) -> str:
    """The daemon's unit for a profile: its memory cap follows the profile's model budget."""
    text = (RECIPES / "edgerun-daemon.service").read_text()
    if not profile.memory_mb:
        return "".join(line for line in text.splitlines(keepends=True)
                       if "MemoryMax=@MEMORY_MAX@" not in line)
    return text.replace("@MEMORY_MAX@", f"{2 * profile.memory_mb + DAEMON_MEMORY_MB}M")


def _stage_sources(target: Path) -> Path:
    """The edgerun packages the daemon needs, laid out as one `edgerun/` tree.

    edgerun maps top-level folders (runtime/, adapters/, devices/) onto `edgerun.*`, which an
    editable install resolves with an import hook that PyInstaller's analysis cannot follow.
    """
    import edgerun
    import edgerun.adapters
    import edgerun.devices
    import edgerun.runtime

    if target.exists():
        shutil.rmtree(target)
    root = target / "edgerun"
    root.mkdir(parents=True)
    shutil.copyfile(Path(edgerun.__file__), root / "__init__.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "http", "tests")
    for package in (edgerun.adapters, edgerun.runtime, edgerun.devices):
        shutil.copytree(Path(package.__file__).parent, root / package.__name__.split(".")[-1],
                        ignore=skip)
    return target


_SEP = ":"  # PyInstaller's --add-data separator on Linux and macOS
