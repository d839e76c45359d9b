"""Checks rendered KServe manifests against the KServe SDK's own models.

Run with the external-clients virtualenv (the SDK pins protobuf below 7). Reads a
multi-document YAML file; prints one line per problem and exits 1 if there are any.
Every key must be a field of the SDK (or Kubernetes client) model at that place, and
every nested value must have that field's type.
"""

from __future__ import annotations

import re
import sys

import kserve.models
import kubernetes.client.models
import yaml

MODELS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "object": object,
    "datetime": str,
    "bytes": str,
}


def model_class(name: str) -> type:
    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(name)


def check(value: object, type_name: str, path: str, problems: list[str]) -> None:
    listed = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    mapped = re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name)
    if listed:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return
        for index, item in enumerate(value):
            check(item, listed.group(1), f"{path}[{index}]", problems)
    elif mapped:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            check(item, mapped.group(1) or mapped.group(2), f"{path}.{key}", problems)
    elif type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__}")
    elif type_name == "ResourceQuantity" or type_name.endswith("Quantity"):
        if not isinstance(value, (str, int, float)):
            problems.append(f"{path}: expected a quantity")
    else:
        check_model(value, model_class(type_name), path, problems)


def check_model(value: object, klass: type, path: str, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a {klass.__name__} mapping")
        return
    by_json = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            problems.append(f"{path}.{key}: not a field of {klass.__name__}")
            continue
        check(item, klass.openapi_types[attr], f"{path}.{key}", problems)


def main() -> int:
    problems: list[str] = []
    with open(sys.argv[1]) as handle:
        documents = [d for d in yaml.safe_load_all(handle) if d]
    for document in documents:
        key = (document.get("apiVersion"), document.get("kind"))
        name = f"{key[1]}/{document.get('metadata', {}).get('name')}"
        if key in MODELS:
            check_model(document, model_class(MODELS[key]), name, problems)
            print(f"checked {name} against {MODELS[key]}")
    print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
