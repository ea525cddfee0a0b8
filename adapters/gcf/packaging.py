"""`edgerun package gcf`: the source folder `gcloud functions deploy --source` takes.

It holds the entry module (functions/gcf/main.py), the parts of edgerun a function imports (as
for Lambda), the verified bundle as `model/` and a requirements.txt: Cloud Build installs the
dependencies on deploy, for the runtime's own Python and platform, so no wheels travel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgerun.adapters.function_sources import (BACKEND_REQUIREMENTS, REQUIREMENTS, copy_model,
                                               copy_sources)
from edgerun.runtime.bundle import Bundle
from edgerun.runtime.errors import BundleError

FUNCTION_DIR = Path(__file__).resolve().parents[2] / "functions" / "gcf"
GCF_REQUIREMENTS = (*REQUIREMENTS, "functions-framework>=3.5")


def package_gcf(bundle: Path, output: Path) -> Path:
    """Write the function's source folder into `output` (which must be empty or new)."""
    if not (FUNCTION_DIR / "main.py").is_file():
        raise BundleError(f"{FUNCTION_DIR / 'main.py'} is missing: package from a checkout of "
                          "edgerun (pip install -e .)")
    if output.exists() and any(output.iterdir()):
        raise BundleError(f"{output} is not empty: the function's source folder must hold "
                          "nothing else (gcloud uploads all of it)")
    with Bundle.open(bundle) as opened:  # verified before anything is built around it
        output.mkdir(parents=True, exist_ok=True)
        copy_model(opened.path, output / "model")
        shutil.copy2(FUNCTION_DIR / "main.py", output / "main.py")
        copy_sources(output, "edgerun.adapters.gcf", opened.manifest.backend)
        requirements = [*GCF_REQUIREMENTS, *BACKEND_REQUIREMENTS.get(opened.manifest.backend, ())]
        (output / "requirements.txt").write_text("\n".join(requirements) + "\n")
    return output
