"""deploy/k8s/: the Kubernetes manifests validate, and agree with each other and with lorahive's flags.

The core objects (Deployment, Service, PersistentVolumeClaim) are checked strictly against Kubernetes' own
OpenAPI schemas, which `kubernetes-validate` (dev extra) ships for every release. The Gateway API and Inference
Extension objects are custom resources whose schemas live in their CRDs, which nothing here ships; they are
checked against the fields we use, written below from the extensions' API references (inference.networking.k8s.io
v1, gateway.networking.k8s.io v1): a field outside them fails, as a misspelt one would. Each check is also run on
a broken copy, so each can fail.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.cli.serve_command import add_settings_flags, settings_from

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"

PORT = {"type": "object", "required": ["number"], "additionalProperties": False,
        "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}
NAME = {"type": "string", "minLength": 1, "maxLength": 253}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": NAME}}
CUSTOM_RESOURCES: dict[tuple[str, str], dict[str, Any]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"], "additionalProperties": False,
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                         "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                        "additionalProperties": {"type": "string"}}}},
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": PORT},
            "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
            "endpointPickerRef": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME, "port": PORT,
                               "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
        },
    },
    ("gateway.networking.k8s.io/v1", "Gateway"): {
        "type": "object", "required": ["gatewayClassName", "listeners"], "additionalProperties": False,
        "properties": {
            "gatewayClassName": NAME,
            "listeners": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "protocol", "port"],
                "properties": {"name": NAME, "protocol": {"type": "string"},
                               "port": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
        },
    },
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): {
        "type": "object", "required": ["parentRefs", "rules"], "additionalProperties": False,
        "properties": {
            "parentRefs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"]}},
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "matches": {"type": "array", "items": {"type": "object", "properties": {"path": {
                        "type": "object", "required": ["value"], "additionalProperties": False,
                        "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                       "value": {"type": "string", "pattern": "^/"}}}}}},
                    "backendRefs": {"type": "array", "items": {
                        "type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME,
                                       "port": {"type": "integer"}, "weight": {"type": "integer"}}}},
                    "timeouts": {"type": "object", "additionalProperties": False, "properties": {
                        "request": {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                        "backendRequest": {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"}}},
                }}},
        },
    },
}


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def validate(doc: dict[str, Any]) -> None:
    """Raise when `doc` breaks its schema: Kubernetes' own for core kinds, the one above for custom resources."""
    schema = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    jsonschema.validate(doc, {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                              "properties": {"metadata": METADATA, "spec": schema}})


@pytest.mark.parametrize("doc", manifests(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_every_manifest_validates_and_a_broken_copy_does_not(doc: dict[str, Any]) -> None:
    validate(doc)
    broken = copy.deepcopy(doc)
    broken["spec"]["unknownField"] = True
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(broken)


def test_the_pool_the_service_and_the_deployment_select_the_same_pods_on_the_same_port() -> None:
    [deployment], [service], [pool] = by_kind("Deployment"), by_kind("Service"), by_kind("InferencePool")
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert service["spec"]["selector"].items() <= pods.items()
    assert pool["spec"]["selector"]["matchLabels"].items() <= pods.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [port] = container["ports"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port["containerPort"]]
    assert f"--port={port['containerPort']}" in container["args"]
    [route] = by_kind("HTTPRoute")
    backends = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]} \
        in backends
    assert {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]} in backends
    [gateway] = by_kind("Gateway")
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"]}]


def test_the_containers_command_is_lorahive_serve_with_valid_settings_sharing_one_store() -> None:
    """The args parse as `lorahive serve` flags into valid settings; the store is the shared volume; the endpoint
    picker can scrape /metrics without a key."""
    [deployment] = by_kind("Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["lorahive", "serve"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_settings_flags(parser)
    environment = {variable["name"]: variable["value"] for variable in container["env"]}
    settings = settings_from(parser.parse_args(container["args"][2:]), environment)
    assert settings.metrics_public
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    store_volume = volumes[mounts[str(settings.store)]]
    [claim] = [c for c in by_kind("PersistentVolumeClaim")
               if c["metadata"]["name"] == store_volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica writes it
    drain_s = settings.drain_timeout
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_s
