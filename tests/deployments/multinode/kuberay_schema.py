"""Checking a manifest against a CRD's OpenAPI v3 schema (the subset Kubernetes CRDs use), offline.

`validate(instance, schema)` lists what Kubernetes' structural validation would reject: wrong types, missing
required fields, unknown fields (which the API server prunes or, with strict field validation, rejects) and
values outside an enum. `prune(schema, instances)` keeps only the parts of a schema that the given manifests
reach (the names of every field stay, so unknown fields are still caught), which is how
rayservice_v1_schema.json was cut from KubeRay's CRD (ray-project/kuberay, ray-operator/config/crd/bases/
ray.io_rayservices.yaml at commit feeaf72facab, August 2026, version v1; about 1 MB) to a few KB:

    python -m tests.deployments.multinode.kuberay_schema path/to/ray.io_rayservices.yaml \
        deploy/kuberay/rayservice.yaml deploy/kuberay/rayservice-gpu.yaml > \
        tests/deployments/multinode/rayservice_v1_schema.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

KEPT = ("type", "required", "enum", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
_PYTHON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}


def crd_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    (entry,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    kind = schema.get("type")
    if kind is None:
        return True
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _PYTHON_TYPES[kind])


def validate(instance: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    if not _type_ok(instance, schema):
        return [f"{path or '/'}: expected {schema.get('type', 'int-or-string')}, got {type(instance).__name__}"]
    errors = []
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if isinstance(instance, dict):
        properties = schema.get("properties")
        errors += [f"{path}/{name}: required" for name in schema.get("required", ()) if name not in instance]
        for name, value in instance.items():
            if properties is not None and name in properties:
                errors += validate(value, properties[name], f"{path}/{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(value, schema["additionalProperties"], f"{path}/{name}")
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}/{name}: unknown field")
    elif isinstance(instance, list) and "items" in schema:
        for index, value in enumerate(instance):
            errors += validate(value, schema["items"], f"{path}/{index}")
    return errors


def prune(schema: dict[str, Any], instances: list[Any]) -> dict[str, Any]:
    pruned = {key: schema[key] for key in KEPT if key in schema}
    if "anyOf" in schema:
        pruned["anyOf"] = [{key: option[key] for key in KEPT if key in option} for option in schema["anyOf"]]
    objects = [instance for instance in instances if isinstance(instance, dict)]
    if "properties" in schema:
        pruned["properties"] = {
            name: prune(sub, [obj[name] for obj in objects if name in obj]) if any(name in o for o in objects) else {}
            for name, sub in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        values = [value for obj in objects for value in obj.values()]
        pruned["additionalProperties"] = prune(schema["additionalProperties"], values)
    if "items" in schema:
        pruned["items"] = prune(schema["items"], [item for instance in instances if isinstance(instance, list)
                                                 for item in instance])
    return pruned


def main(crd_path: str, *manifest_paths: str) -> None:
    with open(crd_path) as file:
        schema = crd_schema(yaml.safe_load(file))
    manifests = []
    for path in manifest_paths:
        with open(path) as file:
            manifests.append(yaml.safe_load(file))
    json.dump(prune(schema, manifests), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
