"""Helpers of the Kubernetes and container-image tests (imported by name: conftest puts this
folder on sys.path).

:class:`Build` wraps the objects of one built overlay and answers the wiring questions the
tests ask: which pod templates a selector matches, which ports a workload declares, which
environment variables a container gets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))

# The process/port contract the manifests rely on (docs/services.md, services/common/config.py).
GRPC_PORTS = {"policy": 50051, "reference": 50052, "reward": 50053, "trainer": 50054}
METRICS_PORTS = {"policy": 9101, "reference": 9102, "reward": 9103, "trainer": 9104}
GATEWAY_PORT = 8000
ROLES = (*GRPC_PORTS, "gateway")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions); {} matches all."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Workload:
    """A pod-creating object and its pod template."""

    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def template(self) -> dict[str, Any]:
        return self.obj["spec"]["template"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.template["metadata"].get("labels") or {}

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def role(self) -> str | None:
        return self.pod_labels.get("app.kubernetes.io/component")

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        spec = self.pod_spec
        return list(spec.get("containers") or []) + (list(spec.get("initContainers") or []) if init else [])

    @property
    def main(self) -> dict[str, Any]:
        """The serving container (the first one)."""
        return self.pod_spec["containers"][0]

    def container_ports(self) -> dict[str | int, int]:
        """Every declared port, by name and by number -> number."""
        out: dict[str | int, int] = {}
        for c in self.containers(init=False):
            for p in c.get("ports") or []:
                out[p["containerPort"]] = p["containerPort"]
                if "name" in p:
                    out[p["name"]] = p["containerPort"]
        return out

    def env(self, container: dict[str, Any] | None = None) -> dict[str, Any]:
        """Plain env entries of a container (name -> entry)."""
        c = container or self.main
        return {e["name"]: e for e in c.get("env") or []}


@dataclass
class Build:
    """The objects of one built overlay."""

    name: str
    objects: list[dict[str, Any]]
    by_kind: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for o in self.objects:
            self.by_kind.setdefault(o["kind"], []).append(o)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return self.by_kind.get(kind, [])

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        for o in self.kind(kind):
            if o["metadata"]["name"] == name:
                return o
        return None

    def workloads(self) -> list[Workload]:
        return [Workload(o) for k in WORKLOAD_KINDS for o in self.kind(k)]

    def workload(self, role: str) -> Workload:
        found = [w for w in self.workloads() if w.role == role]
        assert len(found) == 1, (
            f"{self.name}: expected one workload for {role!r}, found {[w.name for w in found]}"
        )
        return found[0]

    def matching(self, selector: dict[str, Any] | None) -> list[Workload]:
        """Workloads whose pods a LabelSelector (matchLabels/matchExpressions) selects."""
        return [w for w in self.workloads() if selector_matches(selector, w.pod_labels)]

    def service_pods(self, service: dict[str, Any]) -> list[Workload]:
        """Workloads whose pods a Service selects (a Service selector is a plain label map)."""
        selector = service["spec"].get("selector") or {}
        assert selector, f"Service {service['metadata']['name']} has no selector"
        return self.matching({"matchLabels": selector})

    def config_maps(self) -> dict[str, dict[str, str]]:
        return {o["metadata"]["name"]: o.get("data") or {} for o in self.kind("ConfigMap")}

    def pod_env(self, w: Workload, container: dict[str, Any] | None = None) -> dict[str, str | None]:
        """The environment a container gets: envFrom ConfigMaps, then env (values; refs -> None)."""
        c = container or w.main
        cms = self.config_maps()
        out: dict[str, str | None] = {}
        for src in c.get("envFrom") or []:
            if "configMapRef" in src:
                out.update(cms.get(src["configMapRef"]["name"], {}))
        for e in c.get("env") or []:
            out[e["name"]] = e.get("value")
        return out


def python_sources() -> Iterator[Path]:
    """The project's own Python files (not the tests, not the virtual environment)."""
    skip = {".venv", "venv", "tests", ".git", "build", "dist", "node_modules", "k8s", "docker"}
    for p in REPO.rglob("*.py"):
        rel = p.relative_to(REPO).parts
        if rel and rel[0] not in skip and "__pycache__" not in rel:
            yield p


def env_name_is_read(name: str, code: str) -> bool:
    """True when some project code reads the environment variable ``name``.

    Either the full name appears as text (``os.environ.get("PALM_RLHF_X")``, or a flag's help
    naming it), or the services' helper is called with the suffix (``env("X", ...)`` reads
    ``PALM_RLHF_X``).
    """
    if re.search(rf"(?<![A-Z0-9_]){re.escape(name)}(?![A-Z0-9_])", code):
        return True
    if name.startswith("PALM_RLHF_"):
        suffix = name[len("PALM_RLHF_") :]
        return re.search(rf"\benv\(\s*[\"']{re.escape(suffix)}[\"']", code) is not None
    return False
