"""`edgerun predict BUNDLE --input FILE`: one request, outputs printed as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    print(json.dumps({"model": model.name, "version": model.version,
                      "outputs": outputs_to_json(outputs)}))
    return 0
