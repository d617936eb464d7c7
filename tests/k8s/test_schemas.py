"""Every overlay builds with kustomize and every object it produces is valid Kubernetes.

Validation is offline, against the OpenAPI-derived JSON schemas that ``kubernetes-validate``
ships, in strict mode (an unknown or misspelt field is an error, as with
``kubectl apply --validate=strict``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed"
)

OVERLAYS_DIR = Path(__file__).resolve().parents[2] / "k8s" / "overlays"

# The oldest Kubernetes the manifests support (gRPC probes GA since 1.27, the preStop
# sleep action since 1.30) and the newest schema the validator ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

# Custom resources have no schema in the validator; they get the wiring tests instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def test_there_are_the_required_overlays():
    found = {p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml")}
    assert {"cpu-demo", "gpu"} <= found, f"overlays found: {sorted(found)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(overlay, version):
    assert overlay.objects, f"{overlay.name} built to nothing"
    errors = []
    for obj in overlay.objects:
        ident = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{ident}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{ident}: no schema ({e.message}); add it to CUSTOM_KINDS only if it is a CRD")
    assert not errors, f"{overlay.name} against Kubernetes {version}:\n" + "\n".join(errors)


def test_validation_rejects_a_misspelt_field(build_overlay):
    """Guards the test above: strict validation must notice an unknown field."""
    build = build_overlay("cpu-demo")
    dep = copy.deepcopy(build.workload("policy").obj)
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_object_names_are_unique_per_kind(overlay):
    seen: set[tuple[str, str, str]] = set()
    for obj in overlay.objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert key not in seen, f"{overlay.name}: duplicate {key}"
        seen.add(key)


def test_every_namespaced_object_lands_in_one_namespace(overlay):
    """A namespace missing on an overlay's own objects silently breaks name references."""
    namespaces = {o["metadata"].get("namespace") for o in overlay.objects if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay.name}: namespaces {namespaces}"
