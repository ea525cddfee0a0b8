"""Check KServe manifests against KServe's published API types, offline.

    python -m tests.kserve_schema FILE.yaml ...    # prints each problem; exit 1 if any

The schema is the one KServe publishes with its Python SDK (`kserve.models`, generated from the
same Go types as its CRDs; Kubernetes types such as V1Container from `kubernetes.client`): every
field must be one the type declares, with the declared type; constructing each object runs the
SDK's own client-side checks (required fields, enums). Runs in its own process because the SDK
registers the `inference` protobuf package, as tritonclient does, and one process holds it once.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import kserve.models
import kubernetes.client.models
import yaml

PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
              "object": (object,), "date": (str,), "datetime": (str,), "bytes": (str,)}
# Both spellings occur: kserve's `list[T]`/`dict(str, T)`, kubernetes' `List[T]`/`Dict[str, T]`.
LIST = re.compile(r"^[Ll]ist\[(.*)\]$")
DICT = re.compile(r"^(?:dict\(str, (.*)\)|Dict\[str, (.*)\])$")


def model_class(name: str) -> type | None:
    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)


def check(value: Any, type_name: str, path: str, problems: list[str]) -> None:
    if value is None:
        return
    listed, mapped = LIST.match(type_name), DICT.match(type_name)
    if listed:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for index, item in enumerate(value):
            check(item, listed.group(1), f"{path}[{index}]", problems)
    elif mapped:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        for key, item in value.items():
            check(item, mapped.group(1) or mapped.group(2), f"{path}.{key}", problems)
    elif type_name in PRIMITIVES:
        kinds = PRIMITIVES[type_name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds
                                            and type_name != "object"):
            problems.append(f"{path}: expected {type_name}, got {value!r}")
    else:
        klass = model_class(type_name)
        if klass is None:  # a type the SDK leaves opaque (quantities, int-or-string)
            return
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a {type_name} mapping, got {value!r}")
            return
        fields = {key: attr for attr, key in klass.attribute_map.items()}
        for key in value:
            if key not in fields:
                problems.append(f"{path}.{key}: {type_name} has no such field")
        known = {fields[key]: item for key, item in value.items() if key in fields}
        for attr, item in known.items():
            check(item, klass.openapi_types[attr], f"{path}.{klass.attribute_map[attr]}",
                  problems)
        try:
            klass(**known)  # the SDK's own checks: required fields, allowed values
        except (TypeError, ValueError) as exc:
            problems.append(f"{path}: {type_name}: " + " ".join(str(exc).split()))


def check_document(document: dict, where: str) -> list[str]:
    api_version, kind = document.get("apiVersion", ""), document.get("kind", "")
    group, _, version = api_version.partition("/")
    if group != "serving.kserve.io":
        return [f"{where}: {api_version} {kind} is not a KServe kind"]
    type_name = f"V{version[1:]}{kind}" if version.startswith("v") else ""
    if model_class(type_name) is None:
        return [f"{where}: KServe {version} has no kind {kind}"]
    problems: list[str] = []
    check(document, type_name, where, problems)
    return problems


def main(paths: list[str]) -> int:
    problems = []
    checked = 0
    for path in paths:
        with open(path) as handle:
            for index, document in enumerate(yaml.safe_load_all(handle)):
                if document and document.get("apiVersion", "").startswith("serving.kserve.io/"):
                    problems += check_document(document, f"{path}#{index}")
                    checked += 1
    for problem in problems:
        print(problem)
    print(f"checked {checked} KServe objects: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
