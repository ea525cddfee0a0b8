"""Where a function's model is: `EDGERUN_MODEL`, resolved to a local bundle folder or archive.

- A path (absolute, or relative to the code package, `LAMBDA_TASK_ROOT`): a bundle folder or
  `.tar.gz` shipped in the package or in a layer (`/opt/...`). An archive is unpacked into a
  staging folder of this process in the cache (`/tmp/edgerun/`), served from there for the
  process's life; Lambda kills a start (an init over its limit, a timeout, out of memory) and
  keeps /tmp for the next, so the next start removes the copies of processes that are gone.
- `s3://BUCKET/KEY`: a bundle `.tar.gz`, downloaded once into `/tmp` and verified against
  `EDGERUN_MODEL_SHA256`, which is required: the digest pinned in the function's configuration
  (a SAM parameter), not metadata stored beside the object, decides what may be served. The
  verified archive is extracted to `/tmp/edgerun/<sha256>/`, so a later cold start of the same
  execution environment (a restart after a crash or a timeout) neither downloads nor extracts,
  and the staging folder of a start cut off while it downloaded or extracted is removed.

Staging folders are `edgerun.runtime.staging`'s: `.partial-<pid>-<random>[-<name>]`, each held
by its process and swept once no process holds it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from edgerun.adapters.single_bundle import unpacked
from edgerun.runtime import archive, staging
from edgerun.runtime.bundle import MANIFEST, sha256_file
from edgerun.runtime.errors import BundleError

SHA256_VARIABLE = "EDGERUN_MODEL_SHA256"
DEFAULT_CACHE = Path("/tmp/edgerun")
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: Copies the object at an s3:// URI to a local file.
Download = Callable[[str, Path], None]


def download_s3(uri: str, destination: Path) -> None:
    """The object at `uri` into `destination`, with boto3 (part of the Lambda runtime)."""
    try:
        import boto3
    except ImportError:
        raise BundleError(f"{uri} is an s3:// URI, which needs boto3 (the Lambda runtime has "
                          "it; elsewhere: pip install boto3)") from None
    bucket, _, key = uri[len("s3://"):].partition("/")
    try:
        boto3.client("s3").download_file(bucket, key, str(destination))
    except Exception as exc:  # botocore's errors name the bucket, key and reason
        raise BundleError(f"{uri}: download failed: {exc}") from exc


def locate(spec: str, *, sha256: str | None = None, cache: Path = DEFAULT_CACHE,
           task_root: Path | None = None, download: Download = download_s3) -> Path:
    """The local bundle folder or archive that `spec` (EDGERUN_MODEL's value) names."""
    if spec.startswith("s3://"):
        return cached_download(spec, sha256 or "", cache, download)
    path = Path(spec)
    if not path.is_absolute():
        path = (task_root or Path(os.environ.get("LAMBDA_TASK_ROOT") or Path.cwd())) / path
    if not path.exists():
        raise BundleError(f"{path}: no such bundle folder or archive")
    if path.is_file() and archive.is_archive_name(path.name):
        return unpacked(path, cache)
    return path


def cached_download(uri: str, sha256: str, cache: Path, download: Download) -> Path:
    """The extracted bundle of a verified download, reusing one an earlier start made."""
    if not uri[len("s3://"):].partition("/")[2]:
        raise BundleError(f"{uri}: an s3:// model needs a bucket and a key")
    sha256 = sha256.strip().lower()
    if not _SHA256.fullmatch(sha256):
        raise BundleError(f"an s3:// model needs {SHA256_VARIABLE}, the archive's sha256 "
                          f"(64 hex digits; `sha256sum bundle.tar.gz`), got {sha256!r}")
    folder = cache / sha256
    if (folder / MANIFEST).is_file():  # only a complete extraction is ever renamed into place
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    # /tmp outlives the process: an init over Lambda's 10 s (a large model), or a timeout,
    # kills it while it downloads or extracts, and its folder stays; the next start would then
    # need room for a second copy, fail out of space, and so would every start after it
    staging.sweep(cache)
    with staging.staged(cache) as staged:
        downloaded = staged / "bundle.tar.gz"
        download(uri, downloaded)
        actual = sha256_file(downloaded)
        if actual != sha256:
            raise BundleError(f"{uri}: the downloaded archive's sha256 is {actual}, but "
                              f"{SHA256_VARIABLE} is {sha256} (a different or corrupt object)")
        extracted = staged / "bundle"
        archive.unpack(downloaded, extracted)
        try:
            extracted.rename(folder)
        except OSError:  # another process finished first: use its copy
            if not (folder / MANIFEST).is_file():
                raise
    return folder
