"""Run one request through a bundle with edgerun's own core, from a source checkout.

Meant for the arm64 root: `qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11 run_bundle.py REPO
BUNDLE PROFILE INPUTS.npz OUTPUTS.npz`, where only numpy and apache-tvm are installed (in
/opt/edgerun-py): the packages are mounted from the checkout's folders as pyproject.toml maps
them, so the code under test is the repository's, not a copy.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PACKAGES = {"edgerun": "edgerun", "edgerun.devices": "devices", "edgerun.runtime": "runtime"}


def mount(repo: Path) -> None:
    for name, folder in PACKAGES.items():
        spec = importlib.util.spec_from_file_location(
            name, repo / folder / "__init__.py", submodule_search_locations=[str(repo / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def main(repo: str, bundle: str, profile: str, inputs: str, outputs: str) -> None:
    sys.path.insert(0, "/opt/edgerun-py")
    mount(Path(repo))
    import numpy as np

    from edgerun.runtime import Model

    model = Model.load(bundle, profile)
    with np.load(inputs) as data:
        request = {name: data[name] for name in data.files}
    np.savez(outputs, **model.predict(request))
    model.check_golden()
    print(json.dumps(model.describe()))


if __name__ == "__main__":
    main(*sys.argv[1:])
