"""`edgerun predict BUNDLE --input FILE`: one request, outputs printed as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from edgerun.cli.inputs import load_inputs, outputs_to_json
from edgerun.runtime.model import Model


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("predict", help="run one request through a bundle")
    parser.add_argument("bundle", type=Path, help="bundle folder or archive (.tar.gz, .zip)")
    parser.add_argument("--input", "-i", type=Path, required=True,
                        help='.npy, .npz or JSON {"name": [[...]]}')
    parser.add_argument("--device", default=None, help="device profile to load with")
    parser.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    model = Model.load(args.bundle, args.device)
    try:
        inputs = load_inputs(args.input, [spec.name for spec in model.signature.inputs])
        outputs = model.predict(inputs)
    finally:
        model.close()
    # orjson writes NaN and infinities as null: JSON has no such numbers, and jq refuses them
    print(orjson.dumps({"model": model.name, "version": model.version,
                        "outputs": outputs_to_json(outputs)}).decode())
    return 0
