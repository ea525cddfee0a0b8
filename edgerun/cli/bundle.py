"""`edgerun bundle create|inspect|verify|pack|unpack`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgerun.cli.inputs import load_inputs
from edgerun.runtime import archive, staging
from edgerun.runtime.backends import backend_class, backend_for_file
from edgerun.runtime.bundle import SIGNATURE_FILE, Bundle, create_bundle
from edgerun.runtime.errors import BundleError
from edgerun.runtime.model import Model

out = Console(highlight=False)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bundle", help="create, inspect, verify and pack bundles")
    sub = parser.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")

    create = sub.add_parser("create", help="bundle an ONNX or TFLite model with its manifest "
                                           "and golden sample")
    create.add_argument("model", type=Path, help="model file (.onnx or .tflite)")
    create.add_argument("--name", required=True)
    create.add_argument("--version", required=True, help="integer or semver")
    create.add_argument("-o", "--output", type=Path, required=True,
                        help="bundle folder, or a path ending in .tar.gz or .zip for an archive")
    create.add_argument("--max-batch-size", type=int, default=None,
                        help="largest batch the model may run (default: no limit); 0 for "
                             "a model whose dim 0 is no batch (a sequence, say): callers' "
                             "requests are then never stacked")
    create.add_argument("--golden-input", type=Path, default=None,
                        help="sample input (.npy, .npz or JSON) instead of a generated one")
    create.add_argument("--device", default=None, help="device profile the bundle targets")
    create.set_defaults(handler=_create)

    inspect = sub.add_parser("inspect", help="show a bundle's manifest")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(handler=_inspect)

    verify = sub.add_parser("verify", help="check every hash, load the model, run its golden "
                                           "sample")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--device", default=None, help="device profile to load with")
    verify.add_argument("--trust", type=Path, action="append", default=[], metavar="PUBKEY",
                        help="also require a signature by this public key (repeatable: any "
                             "one of them)")
    verify.set_defaults(handler=_verify)

    sign = sub.add_parser("sign", help="sign a bundle (folder or archive) with an Ed25519 key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private key (edgerun keys "
                                                               "generate)")
    sign.set_defaults(handler=_sign)

    pack = sub.add_parser("pack", help="pack a bundle folder into a .tar.gz or .zip (by -o's name)")
    pack.add_argument("bundle", type=Path)
    pack.add_argument("-o", "--output", type=Path, required=True)
    pack.set_defaults(handler=_pack)

    unpack = sub.add_parser("unpack", help="safely extract a bundle archive and verify it")
    unpack.add_argument("archive", type=Path)
    unpack.add_argument("-o", "--output", type=Path, required=True)
    unpack.set_defaults(handler=_unpack)


def _create(args: argparse.Namespace) -> int:
    """Made under a hidden name beside -o and renamed into place (`staging.replacing`): a
    failed, interrupted or killed run leaves no partial bundle there, and no half-written
    archive in place of one that was there."""
    output = Path(args.output)
    as_archive = archive.is_archive_name(output.name)
    if not as_archive and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BundleError(f"{output}: output folder exists and is not empty")
    why = staging.unwritable(output)
    if why:
        raise BundleError(f"{output}: the output cannot be written there: {why}")
    golden = None
    if args.golden_input is not None:
        signature = backend_class(backend_for_file(args.model)).inspect(args.model)
        golden = load_inputs(args.golden_input, [spec.name for spec in signature.inputs])
    with tempfile.TemporaryDirectory(prefix="edgerun-create-") as scratch, \
            staging.replacing(output) as temporary:
        folder = Path(scratch) / "bundle" if as_archive else temporary
        bundle = create_bundle(args.model, folder, name=args.name, version=args.version,
                               max_batch_size=args.max_batch_size, golden_inputs=golden,
                               device=args.device)
        if as_archive:
            bundle.pack(temporary)
    out.print(f"created bundle [bold]{args.name}[/] version {args.version} at {output}")
    _print_manifest(bundle.manifest.to_json())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with Bundle.open(args.bundle, verify=False) as bundle:
        manifest = bundle.manifest.to_json()
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_manifest(manifest)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgerun.runtime import signing

    trusted = signing.load_public_keys(args.trust) if args.trust else None
    signed = None
    if trusted and Path(args.bundle).is_file():  # an archive: its signature before unpacking
        signed = signing.verify_archive(args.bundle, trusted)
    with Bundle.open(args.bundle, expected=signed.files if signed else None) as bundle:
        out.print(f"hashes: {len(bundle.manifest.files)} files match the manifest")
        if trusted:
            signer = signing.verify_folder(bundle, trusted)
            out.print(f"signature: valid, key id {signer}")
        elif (bundle.path / SIGNATURE_FILE).is_file():
            out.print("signature: present, not checked (--trust KEY checks it)")
        model = Model.load(bundle, args.device)
        model.check_golden()
        described = model.describe()
        out.print(f"golden: output matches the build's on {described['backend']} "
                  f"{described.get('providers', '')}".rstrip())
    out.print(f"[bold green]ok[/] {bundle.manifest.name} version {bundle.manifest.version}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from edgerun.runtime import signing

    if args.bundle.is_dir():
        with Bundle.open(args.bundle) as bundle:
            signer = signing.sign_folder(bundle, args.key)
    else:
        with Bundle.open(args.bundle) as bundle:  # an archive: sign its copy, repack in place
            signer = signing.sign_folder(bundle, args.key)
            with staging.replacing(args.bundle) as packed:  # the same name: the same format
                bundle.pack(packed)
    out.print(f"signed {args.bundle} with key id {signer}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    with Bundle.open(args.bundle) as bundle, staging.replacing(args.output) as packed:
        bundle.pack(packed)
    out.print(f"packed {args.bundle} -> {args.output}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    """Extracted beside the output and verified there: only a verified bundle reaches it."""
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BundleError(f"{output}: extraction folder is not empty")
    with staging.replacing(output) as temporary:  # a killed run's is swept by the next
        with Bundle.open(archive.unpack(args.archive, temporary)) as bundle:
            manifest = bundle.manifest
    out.print(f"unpacked {manifest.name} version {manifest.version} -> {output} (verified)")
    return 0


def _batching(manifest: dict) -> str:
    """As a server's metadata says it: requests are stacked only when every input and output
    has its batch on axis 0 (`Signature.batchable`); an output of another shape (a total over
    the rows) makes the model unbatched, though its input's dim 0 is dynamic."""
    if not manifest["inputs"] or not all(spec.get("batch_axis") == 0 for spec in (
            *manifest["inputs"], *manifest["outputs"])):
        return "0 (no batch axis)"
    return str(manifest.get("max_batch_size") or "unlimited")


def _print_manifest(manifest: dict) -> None:
    """Every value escaped: a bundle's names are its maker's text, and rich would take
    `logits[batch]` for markup (or fail on `[/x]`), showing what is not there."""
    out.print(f"[bold]{escape(manifest['name'])}[/] version {escape(str(manifest['version']))}  "
              f"backend {escape(manifest['backend'])}  device "
              f"{escape(str(manifest['device'].get('profile')))}  "
              f"max_batch_size {_batching(manifest)}")
    table = Table("", "tensor", "dtype", "shape", "batch axis")
    for kind in ("inputs", "outputs"):
        for spec in manifest[kind]:
            table.add_row(kind[:-1], escape(spec["name"]), escape(spec["dtype"]),
                          str(spec["shape"]), str(spec["batch_axis"]))
    out.print(table)
    files = Table("file", "size", "sha256")
    for name, entry in manifest["files"].items():
        files.add_row(escape(name), f"{entry['size']:,}", escape(entry["sha256"][:16]) + "…")
    out.print(files)
