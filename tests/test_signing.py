"""Signed bundles: keys, signing, and verification that says why it refused."""

from __future__ import annotations

import json
import re
import shutil
import stat
import zipfile

import pytest

from edgerun.examples import mlp_onnx
from edgerun.runtime import Bundle, archive
from edgerun.runtime.errors import BundleError
from edgerun.runtime.signing import (canonical_manifest, generate_keys, load_public_key,
                                     sign_folder, verify_archive, verify_folder)
from tests.cli import edgerun


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keys(tmp_path / "keys")
    return private, load_public_key(public)


def test_private_key_is_owner_only_and_never_overwritten(tmp_path, keys):
    private, _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(BundleError, match="refusing to overwrite"):
        generate_keys(private.parent)


def test_signed_bundle_verifies_and_survives_reindenting(make_bundle, keys):
    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]), version="2")
    assert sign_folder(bundle.path, private) == public.key_id
    assert verify_folder(bundle.path, [public]) == public.key_id
    manifest = bundle.path / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=7))
    assert verify_folder(bundle.path, [public]) == public.key_id
    Bundle.open(bundle.path).close()  # signature.sig is allowed beside the listed files


def test_refusals_say_which(make_bundle, keys, tmp_path):
    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]))
    with pytest.raises(BundleError, match="unsigned"):
        verify_folder(bundle.path, [public])
    sign_folder(bundle.path, private)
    _, stranger_pub = generate_keys(tmp_path / "stranger")
    with pytest.raises(BundleError, match="key id unknown"):
        verify_folder(bundle.path, [load_public_key(stranger_pub)])
    # a changed manifest (here: a version bump) no longer matches the signature
    manifest = bundle.path / "manifest.json"
    data = json.loads(manifest.read_text())
    data["version"] = "99"
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        verify_folder(bundle.path, [public])
    # a forged signature under the trusted key id
    sig = json.loads((bundle.path / "signature.sig").read_text())
    sig["signature"] = "A" * 86 + "=="
    (bundle.path / "signature.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="does not verify"):
        verify_folder(bundle.path, [public])


def test_a_manifest_with_broken_unicode_is_a_bundle_error(make_bundle, keys):
    """A "\\ud800" escape parses as JSON but has no UTF-8 bytes: a typed refusal (a registry
    answers a push with it), not an encoding error from deep inside."""
    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]))
    sign_folder(bundle.path, private)
    manifest = bundle.path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"created": {',
                                                     '"created": {"x": "\\ud800", ', 1))
    broken = "manifest.json: holds text that is not valid Unicode"
    with pytest.raises(BundleError, match=broken):
        verify_folder(bundle.path, [public])
    with pytest.raises(BundleError, match=broken):
        sign_folder(bundle.path, private)


@pytest.mark.parametrize("file, message", [
    ("signature.sig", "signature.sig: malformed signature file (JSON nested too deep)"),
    ("manifest.json", "manifest.json: JSON nested too deep to be a manifest"),
])
def test_json_nested_too_deep_to_parse_is_a_bundle_error(make_bundle, keys, tmp_path, file,
                                                         message):
    """json parses recursively: a few kB of brackets in a signed bundle's file was a
    RecursionError (a traceback from `bundle verify`, a 500 for a push), not a refusal."""
    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]))
    sign_folder(bundle.path, private)
    (bundle.path / file).write_bytes(b"[" * 50_000)
    packed = archive.pack(bundle.path, tmp_path / "b.tar.gz")
    with pytest.raises(BundleError, match=re.escape(message)):
        verify_folder(bundle.path, [public])
    with pytest.raises(BundleError, match=re.escape(message)):
        verify_archive(packed, [public])


def test_canonical_bytes_cover_every_file_hash(make_bundle):
    bundle = make_bundle(mlp_onnx([4, 3]))
    canonical = json.loads(canonical_manifest(bundle.path))
    assert set(canonical["files"]) == {"model.onnx", "golden.npz"}
    assert all(len(entry["sha256"]) == 64 for entry in canonical["files"].values())


def test_cli_generate_sign_verify(tmp_path, make_bundle):
    result = edgerun("keys", "generate", "-o", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    bundle = make_bundle(mlp_onnx([4, 3]), name="m", version="3")
    archive = tmp_path / "m-3.tar.gz"
    bundle.pack(archive)
    trust = ["--trust", str(tmp_path / "k" / "fleet.pub")]
    result = edgerun("bundle", "verify", str(archive), *trust)
    # checked in the archive, before unpacking it (the error named the folder unpacked to)
    assert result.returncode == 2 and f"{archive}: bundle is unsigned" in result.stderr, \
        result.stderr
    result = edgerun("bundle", "sign", str(archive), "--key", str(tmp_path / "k" / "fleet.key"))
    assert result.returncode == 0, result.stderr
    result = edgerun("bundle", "verify", str(archive), *trust)
    assert result.returncode == 0, result.stderr
    assert "signature: valid" in result.stdout
    result = edgerun("bundle", "verify", str(archive))  # said "ok" as if no signature were there
    assert result.returncode == 0 and "signature: present, not checked" in result.stdout
    # an archive whose model file was swapped fails on its hash before any signature check
    folder = tmp_path / "unpacked"
    assert edgerun("bundle", "unpack", str(archive), "-o", str(folder)).returncode == 0
    shutil.copyfile(folder / "golden.npz", folder / "model.onnx")
    result = edgerun("bundle", "verify", str(folder), *trust)
    assert result.returncode == 2 and "tampered" in result.stderr


def test_an_archive_opened_with_its_signed_files_must_still_hold_them(make_bundle, keys,
                                                                     tmp_path):
    """`bundle verify --trust ARCHIVE` checked the signature, then unpacked the archive again
    as it was by then: one swapped in between was written out whole before any check.
    Opened with the signed files, the unpack itself refuses what they do not list."""
    from edgerun.runtime.signing import verify_archive

    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]), version="2")
    sign_folder(bundle.path, private)
    packed = bundle.pack(tmp_path / "signed.tar.gz")
    signed = verify_archive(packed, [public])
    with Bundle.open(packed, expected=signed.files) as opened:
        assert opened.manifest.version == "2"
    swapped = make_bundle(mlp_onnx([4, 5]), version="2").pack(tmp_path / "swapped.tar.gz")
    swapped.replace(packed)
    with pytest.raises(BundleError, match="the signed manifest lists"):
        Bundle.open(packed, expected=signed.files)


def test_signing_an_opened_bundle_signs_the_manifest_it_verified(tmp_path, make_bundle):
    """`bundle sign` read manifest.json again after verifying the bundle: a manifest swapped
    in between was signed, though its files were never checked against it."""
    private, public = generate_keys(tmp_path / "k")
    bundle = make_bundle(mlp_onnx([4, 3]), name="m", version="3")
    opened = Bundle.open(bundle.path)
    manifest = bundle.path / "manifest.json"
    verified = manifest.read_bytes()
    swapped = json.loads(verified)
    swapped["files"]["model.onnx"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(swapped))
    sign_folder(opened, private)
    manifest.write_bytes(verified)
    assert verify_folder(Bundle.open(bundle.path), [load_public_key(public)])


def test_cli_signs_a_zip_bundle_and_keeps_it_a_zip(tmp_path, make_bundle):
    assert edgerun("keys", "generate", "-o", str(tmp_path / "k")).returncode == 0
    archive = make_bundle(mlp_onnx([4, 3]), name="m", version="3").pack(tmp_path / "m-3.zip")
    result = edgerun("bundle", "sign", str(archive), "--key", str(tmp_path / "k" / "fleet.key"))
    assert result.returncode == 0, result.stderr
    assert zipfile.is_zipfile(archive), "signing repacked the zip as a .tar.gz"
    result = edgerun("bundle", "verify", str(archive), "--trust", str(tmp_path / "k" / "fleet.pub"))
    assert result.returncode == 0 and "signature: valid" in result.stdout, result.stderr


#: An SM2 key pair, as `openssl genpkey -algorithm SM2` writes it (OpenSSL 3): valid PEM of a
#: curve `cryptography` does not support.
SM2_PUBLIC = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEG6ZhyKlnGziz1kpGvwOv1cI3Wh+N
7NHlZj+1zswj+F8K6rwdT2IGVTiFcZG/4v+1F0paJcyuk+1YDNF/EbAErA==
-----END PUBLIC KEY-----
"""
SM2_PRIVATE = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqBHM9VAYItBG0wawIBAQQg85aCjdVZP6mOKJu4
ugQBwUNt4JZ8gKsUqm298+qTBN6hRANCAAQbpmHIqWcbOLPWSka/A6/VwjdaH43s
0eVmP7XOzCP4XwrqvB1PYgZVOIVxkb/i/7UXSlolzK6T7VgM0X8RsASs
-----END PRIVATE KEY-----
"""


def test_a_key_of_an_unsupported_algorithm_is_a_bundle_error(tmp_path, make_bundle):
    """cryptography raises UnsupportedAlgorithm (no ValueError) for such a key: `--trust` or
    `--key` with one ended in a traceback rather than an error naming the file."""
    public, private = tmp_path / "sm2.pub", tmp_path / "sm2.key"
    public.write_text(SM2_PUBLIC)
    private.write_text(SM2_PRIVATE)
    with pytest.raises(BundleError, match="sm2.pub: not a readable PEM public key"):
        load_public_key(public)
    bundle = make_bundle(mlp_onnx([4, 3]))
    with pytest.raises(BundleError, match="sm2.key: not a readable PEM private key"):
        sign_folder(bundle.path, private)
    result = edgerun("bundle", "verify", str(bundle.path), "--trust", str(public))
    assert result.returncode == 2 and "not a readable PEM public key" in result.stderr, \
        result.stderr


def test_generate_never_replaces_a_public_key(tmp_path):
    """A device's folder holds the fleet's trusted fleet.pub and no fleet.key: generating
    there silently swapped the trust anchor for a key whose private half is on this host."""
    trusted_private, trusted_public = generate_keys(tmp_path / "fleet")
    device = tmp_path / "device"
    device.mkdir()
    shutil.copyfile(trusted_public, device / "fleet.pub")
    with pytest.raises(BundleError, match="fleet.pub exists; refusing to overwrite"):
        generate_keys(device)
    assert (device / "fleet.pub").read_bytes() == trusted_public.read_bytes()
    assert not (device / "fleet.key").exists()


def test_an_archives_signature_is_checked_from_its_manifest_alone(make_bundle, keys, tmp_path):
    """`verify_archive` reads only manifest.json and signature.sig of an archive (tar or zip)
    and refuses as `verify_folder` does; what it returns is every file the signed manifest
    lists, with its size and sha256, for `archive.unpack(expected=...)`."""
    from edgerun.runtime import archive
    from edgerun.runtime.bundle import sha256_file
    from edgerun.runtime.signing import verify_archive

    private, public = keys
    bundle = make_bundle(mlp_onnx([4, 3]), version="2")
    unsigned = bundle.pack(tmp_path / "unsigned.tar.gz")
    sign_folder(bundle.path, private)
    for suffix in (".tar.gz", ".zip"):
        packed = bundle.pack(tmp_path / f"signed{suffix}")
        signed = verify_archive(packed, [public])
        assert (signed.manifest.name, signed.manifest.version, signed.key_id) == (
            "m", "2", public.key_id)
        assert signed.files == {p.name: (p.stat().st_size, sha256_file(p))
                                for p in bundle.path.iterdir()}
        out = archive.unpack(packed, tmp_path / f"out{suffix}", expected=signed.files)
        assert verify_folder(out, [public]) == public.key_id
    with pytest.raises(BundleError, match="unsigned"):
        verify_archive(unsigned, [public])
    _, stranger_pub = generate_keys(tmp_path / "stranger")
    with pytest.raises(BundleError, match="key id unknown"):
        verify_archive(packed, [load_public_key(stranger_pub)])
    manifest = bundle.path / "manifest.json"
    data = json.loads(manifest.read_text())
    data["version"] = "99"
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        verify_archive(bundle.pack(tmp_path / "changed.tar.gz"), [public])
