"""Ed25519 signatures over a bundle's canonical manifest.

The manifest lists the sha256 and size of every file, so signing its canonical bytes signs the
whole bundle; `Bundle.open` checks the hashes, this module checks who vouched for them.
Canonical bytes are the manifest's JSON re-serialized with sorted keys and no whitespace, so a
re-indented manifest keeps its signature. `signature.sig` is a small JSON document naming the
algorithm, the signing key's id (the first 16 hex digits of the sha256 of the raw public key)
and the base64 signature. `cryptography` is imported when first needed.

`verify_archive` checks the same signature on a bundle archive before anything in it is
extracted: it reads only `manifest.json` and `signature.sig`, and returns what the signed
manifest lists (every file's size and sha256) for `archive.unpack(expected=...)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerun.runtime import archive
from edgerun.runtime.bundle import MANIFEST, SIGNATURE_FILE, Bundle, Manifest, parse_manifest
from edgerun.runtime.errors import BundleError

ALGORITHM = "ed25519"
PRIVATE_KEY_FILE = "fleet.key"
PUBLIC_KEY_FILE = "fleet.pub"
#: A signature file is a few hundred bytes; a bigger one is not read whole.
MAX_SIGNATURE_BYTES = 1 << 16


def canonical_manifest(folder: Path) -> bytes:
    """The bytes a signature covers: the manifest JSON with sorted keys, no whitespace."""
    path = Path(folder) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST}; not a bundle") from None
    return _canonical(raw, path)


def _canonical(raw: bytes, path: str | Path) -> bytes:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:  # json parses recursively: a few kB of "[" was a traceback
        raise BundleError(f"{path}: JSON nested too deep to be a manifest") from None
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:  # a "\ud800" escape: JSON takes it, UTF-8 cannot
        raise BundleError(f"{path}: holds text that is not valid Unicode ({exc.reason} at "
                          f"character {exc.start})") from exc


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its id."""

    key_id: str
    raw: bytes
    source: str = ""

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_public_key(path: str | Path) -> PublicKey:
    """A PEM public key file (as `edgerun keys generate` writes)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:  # an SM2 key: unsupported
        raise BundleError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(key_id(raw), raw, str(path))


def load_public_keys(paths: Iterable[str | Path]) -> list[PublicKey]:
    return [load_public_key(p) for p in paths]


def generate_keys(folder: str | Path) -> tuple[Path, Path]:
    """Write a new key pair: `fleet.key` (PKCS#8 PEM, mode 0600) and `fleet.pub` (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if private_path.exists():
        raise BundleError(f"{private_path} exists; refusing to overwrite a signing key")
    if public_path.exists():  # a trusted key copied here: replacing it changes whom it trusts
        raise BundleError(f"{public_path} exists; refusing to overwrite a public key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # created with owner-only permissions, never readable by others even for a moment
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def sign_folder(folder: str | Path | Bundle, private_key: str | Path) -> str:
    """Sign a bundle folder's manifest; writes `signature.sig`, returns the key id. Given the
    opened `Bundle`, the manifest it verified is signed, not `manifest.json` read again
    (which a writer of the folder could have changed since)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(folder, Bundle):
        manifest, folder = _bundle_canonical(folder), folder.path
    else:
        folder = Path(folder)
        manifest = canonical_manifest(folder)
    private_key = Path(private_key)
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{private_key}: not a readable PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{private_key}: not an Ed25519 private key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    document = {"algorithm": ALGORITHM, "key_id": key_id(raw),
                "signature": base64.b64encode(key.sign(manifest)).decode()}
    temporary = folder / f".{SIGNATURE_FILE}.tmp"
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(folder / SIGNATURE_FILE)
    return document["key_id"]


def read_signature(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SIGNATURE_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: bundle is unsigned (no {SIGNATURE_FILE})")
    return _parse_signature(path.read_bytes(), path)


def _parse_signature(raw: bytes, path: str | Path) -> dict[str, Any]:
    try:
        document = json.loads(raw)
        if document.get("algorithm") != ALGORITHM:
            raise BundleError(f"{path}: algorithm {document.get('algorithm')!r} is not "
                              f"supported (expected {ALGORITHM})")
        signature = base64.b64decode(document["signature"], validate=True)
        return {"key_id": str(document["key_id"]), "signature": signature}
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path}: malformed signature file ({exc})") from exc
    except RecursionError:  # json parses recursively: a few kB of "[" was a traceback
        raise BundleError(f"{path}: malformed signature file (JSON nested too deep)") from None


def verify_folder(folder: str | Path | Bundle, trusted: Iterable[PublicKey]) -> str:
    """Check `signature.sig` against the trusted keys; returns the signer's key id.

    Pass the opened `Bundle` rather than its path: the signature is then checked over the
    manifest the bundle holds (the bytes it was parsed from), the one its files are held to
    when they are read (`Bundle.read_file`). Given a path, `manifest.json` is read again, and
    a folder changed after `Bundle.open` could show a signed manifest here while the bundle
    holds another. BundleError says which way it failed: unsigned, signed by a key id not
    trusted, or a signature that does not verify (a changed manifest, or a forged signature).
    """
    trusted = list(trusted)
    if not trusted:
        raise BundleError("no trusted public keys given; cannot check signatures")
    if isinstance(folder, Bundle):
        bundle, folder = folder, folder.path
        document = read_signature(folder)
        return _check(document, _bundle_canonical(bundle), trusted, folder)
    folder = Path(folder)
    document = read_signature(folder)
    return _check(document, canonical_manifest(folder), trusted, folder)


def _bundle_canonical(bundle: Bundle) -> bytes:
    """The canonical bytes of the manifest a bundle holds; one made without reading a file
    (`Bundle(...)`) is checked against manifest.json, which must parse to the same manifest."""
    path = bundle.path / MANIFEST
    raw = bundle.manifest_bytes
    if raw is None:
        raw = path.read_bytes() if path.is_file() else b""
        if not raw or parse_manifest(raw, path) != bundle.manifest:
            raise BundleError(f"{bundle.path}: {MANIFEST} is not the manifest the bundle "
                              "holds (changed since it was opened)")
    return _canonical(raw, path)


def _check(document: dict[str, Any], message: bytes, trusted: list[PublicKey],
           where: str | Path) -> str:
    known = {key.key_id: key for key in trusted}
    key = known.get(document["key_id"])
    if key is None:
        raise BundleError(f"{where}: key id unknown: signed by {document['key_id']}, "
                          f"trusted are {', '.join(sorted(known))}")
    if not key.verify(document["signature"], message):
        raise BundleError(f"{where}: signature does not verify with any trusted key "
                          f"(manifest changed after signing, or a forged signature)")
    return key.key_id


@dataclass(frozen=True)
class SignedManifest:
    """A bundle archive's manifest whose signature verified, before anything was extracted.

    `files` is what `archive.unpack(expected=...)` takes: every file the bundle may hold with
    its size and sha256, the manifest and signature themselves included (as they were read
    here, so the copies extracted later are these very bytes)."""

    manifest: Manifest
    key_id: str
    files: dict[str, archive.Listed]


def verify_archive(path: str | Path, trusted: Iterable[PublicKey]) -> SignedManifest:
    """Check a bundle archive's signature from its `manifest.json` and `signature.sig` alone,
    extracting nothing (a tar is read through in one pass; nothing is written); the errors
    are `verify_folder`'s. Unpack it with `expected=result.files` to extract only what the
    signed manifest lists, then open it as usual."""
    path = Path(path)
    trusted = list(trusted)
    if not trusted:
        raise BundleError("no trusted public keys given; cannot check signatures")
    found = archive.read_members(path, (MANIFEST, SIGNATURE_FILE))
    raw_manifest, raw_signature = found.get(MANIFEST), found.get(SIGNATURE_FILE)
    if raw_manifest is None:
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle")
    if raw_signature is None:
        raise BundleError(f"{path}: bundle is unsigned (no {SIGNATURE_FILE})")
    if len(raw_signature) > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{path}: {SIGNATURE_FILE} is over {MAX_SIGNATURE_BYTES} bytes")
    document = _parse_signature(raw_signature, f"{path}:{SIGNATURE_FILE}")
    key_id = _check(document, _canonical(raw_manifest, f"{path}:{MANIFEST}"), trusted, path)
    manifest = parse_manifest(raw_manifest, f"{path}:{MANIFEST}")
    files: dict[str, archive.Listed] = {name: (entry.size, entry.sha256)
                                        for name, entry in manifest.files.items()}
    for name, raw in ((MANIFEST, raw_manifest), (SIGNATURE_FILE, raw_signature)):
        if name in files:
            raise BundleError(f"{path}: the manifest lists {name}, which it cannot hash")
        files[name] = (len(raw), hashlib.sha256(raw).hexdigest())
    return SignedManifest(manifest, key_id, files)
