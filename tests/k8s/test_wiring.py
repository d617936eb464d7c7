"""The built manifests fit together and fit the services' process/port/env contract.

Schema validation says each object is well formed; these tests say the objects point at each
other correctly: a Service that selects no pod, a probe on the wrong port or an environment
variable that no code reads all pass schema validation and still break a deployment.
"""

from __future__ import annotations

import json
import re

import pytest
from _k8s_testing import (
    GATEWAY_PORT,
    GRPC_PORTS,
    METRICS_PORTS,
    REPO,
    ROLES,
    env_name_is_read,
    selector_matches,
)

DOCS = REPO / "docs" / "kubernetes.md"
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
PALM_IMAGES = ("palm-rlhf", "palm-rlhf-cuda")


def image_name(image: str) -> str:
    """'registry/x/palm-rlhf-cuda:0.1.0' -> 'palm-rlhf-cuda'."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def palm_containers(build, init: bool = True):
    for w in build.workloads():
        for c in w.containers(init=init):
            if image_name(c["image"]) in PALM_IMAGES:
                yield w, c


# ---------------------------------------------------------------------------------------------
# processes and ports


def test_each_role_runs_as_one_workload_with_the_serve_command(overlay):
    for role in ROLES:
        w = overlay.workload(role)
        assert w.kind == "Deployment", f"{role} is a {w.kind}"
        assert image_name(w.main["image"]) in PALM_IMAGES, w.main["image"]
        # The image's ENTRYPOINT is palm-rlhf; the container only adds the subcommand.
        assert "command" not in w.main, f"{role} overrides the image entrypoint"
        assert w.main.get("args") == ["serve", role], f"{role} args {w.main.get('args')}"


def test_port_env_matches_the_contract_and_the_declared_ports(overlay):
    for role in ROLES:
        w = overlay.workload(role)
        env = overlay.pod_env(w)
        ports = w.container_ports()
        want = GATEWAY_PORT if role == "gateway" else GRPC_PORTS[role]
        assert env.get("PALM_RLHF_PORT") == str(want), f"{role} PALM_RLHF_PORT={env.get('PALM_RLHF_PORT')}"
        assert want in ports, f"{role} does not declare port {want}: {ports}"
        assert env.get("PALM_RLHF_HOST") == "0.0.0.0", (
            f"{role} binds {env.get('PALM_RLHF_HOST')}, not all interfaces"
        )
        if role != "gateway":
            assert env.get("PALM_RLHF_METRICS_PORT") == str(METRICS_PORTS[role])
            assert ports.get("metrics") == METRICS_PORTS[role], f"{role} metrics port {ports}"
            assert ports.get("grpc") == GRPC_PORTS[role]
        else:
            assert ports.get("http") == GATEWAY_PORT


def test_the_contract_table_agrees_with_the_services_defaults():
    """If the services' defaults move, the manifests (and this table) must move with them."""
    config = pytest.importorskip("services.common.config", reason="services.common.config not importable")
    assert config.DEFAULT_PORTS == {**GRPC_PORTS, "gateway": GATEWAY_PORT}
    assert config.DEFAULT_METRICS_PORTS == METRICS_PORTS


def test_model_services_have_grpc_health_probes_on_their_port(overlay):
    for role, port in GRPC_PORTS.items():
        c = overlay.workload(role).main
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            assert probe is not None, f"{role} has no {kind}"
            assert "grpc" in probe, f"{role} {kind} is not a gRPC (grpc.health.v1) probe: {probe}"
            assert probe["grpc"]["port"] == port, f"{role} {kind} probes port {probe['grpc']['port']}"


def test_gateway_has_http_health_and_readiness_probes(overlay):
    c = overlay.workload("gateway").main
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = c[kind]["httpGet"]["port"]
        assert overlay.workload("gateway").container_ports().get(port) == GATEWAY_PORT, f"{kind} port {port}"


def test_prometheus_annotations_point_at_a_metrics_port(overlay):
    for role in ROLES:
        w = overlay.workload(role)
        ann = w.template["metadata"].get("annotations") or {}
        assert ann.get("prometheus.io/scrape") == "true", f"{role} is not scraped"
        assert ann.get("prometheus.io/path") == "/metrics"
        want = GATEWAY_PORT if role == "gateway" else METRICS_PORTS[role]
        assert ann.get("prometheus.io/port") == str(want), (
            f"{role} scrape port {ann.get('prometheus.io/port')}"
        )


# ---------------------------------------------------------------------------------------------
# Services, addresses, autoscalers, disruption budgets


def test_services_select_exactly_one_workload_and_target_its_ports(overlay):
    services = overlay.kind("Service")
    assert services
    for svc in services:
        name = svc["metadata"]["name"]
        selected = overlay.service_pods(svc)
        assert len(selected) == 1, f"Service {name} selects {[w.name for w in selected]}"
        ports = selected[0].container_ports()
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports, f"Service {name} port {p['port']} targets {target!r}, not one of {ports}"


def test_service_ports_are_the_contract_ports(overlay):
    for role in ROLES:
        svc = overlay.get("Service", f"palm-rlhf-{role}")
        assert svc is not None, f"no Service palm-rlhf-{role}"
        assert overlay.service_pods(svc)[0].role == role
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        if role == "gateway":
            assert ports == {"http": GATEWAY_PORT}
        else:
            assert ports == {"grpc": GRPC_PORTS[role], "metrics": METRICS_PORTS[role]}


@pytest.mark.parametrize("role", tuple(GRPC_PORTS))
def test_service_addresses_in_the_config_resolve_to_the_right_service(overlay, role):
    """PALM_RLHF_<ROLE>_ADDR names the in-cluster Service and port of that role."""
    env = overlay.pod_env(overlay.workload("gateway"))
    addr = env.get(f"PALM_RLHF_{role.upper()}_ADDR")
    assert addr, f"PALM_RLHF_{role.upper()}_ADDR is not set"
    host, _, port = addr.rpartition(":")
    svc = overlay.get("Service", host.split(".")[0])
    assert svc is not None, f"{addr}: no Service {host}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]], f"{addr}: the Service has no port {port}"
    assert overlay.service_pods(svc)[0].role == role


def test_hpas_scale_existing_deployments_with_cpu_requests(overlay):
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in overlay.kind("HorizontalPodAutoscaler")}
    assert {"palm-rlhf-gateway", "palm-rlhf-policy"} <= set(hpas), f"HPAs for {sorted(hpas)}"
    for target, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        dep = overlay.get(ref["kind"], target)
        assert dep is not None and ref["apiVersion"] == "apps/v1", f"HPA targets missing {ref}"
        # A replicas field would be reset by every `kubectl apply`, fighting the autoscaler.
        assert "replicas" not in dep["spec"], f"{target} is autoscaled but sets spec.replicas"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in c.get("resources", {}).get("requests", {}), (
                f"{target}/{c['name']}: no CPU request"
            )


def test_pdbs_select_existing_pods(overlay):
    pdbs = overlay.kind("PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} >= {"palm-rlhf-gateway", "palm-rlhf-policy"}
    for pdb in pdbs:
        selected = overlay.matching(pdb["spec"]["selector"])
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {[w.name for w in selected]}"
        spec = pdb["spec"]
        if "minAvailable" in spec:
            # Must leave room to evict: only for autoscaled workloads whose minimum exceeds it.
            hpa = [
                h
                for h in overlay.kind("HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == selected[0].name
            ]
            assert hpa and hpa[0]["spec"]["minReplicas"] > spec["minAvailable"], (
                f"PDB {pdb['metadata']['name']} would block every drain"
            )


def test_trainer_is_a_single_replica_recreated_on_update(overlay):
    dep = overlay.workload("trainer").obj
    assert dep["spec"].get("replicas") == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert not [
        h
        for h in overlay.kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    ]


# ---------------------------------------------------------------------------------------------
# storage, config and secrets


def test_checkpoint_volume_is_written_by_the_trainer_and_read_by_the_servers(overlay):
    claims = {}
    for role in ("trainer", "policy", "reference", "reward"):
        w = overlay.workload(role)
        vols = {v["name"]: v for v in w.pod_spec.get("volumes") or []}
        mounts = [m for m in w.main.get("volumeMounts") or [] if m["mountPath"] == "/data/checkpoints"]
        assert len(mounts) == 1, f"{role} does not mount /data/checkpoints"
        vol = vols[mounts[0]["name"]]
        assert "persistentVolumeClaim" in vol, f"{role}: checkpoints are not on a PVC"
        claims[role] = vol["persistentVolumeClaim"]["claimName"]
        assert bool(mounts[0].get("readOnly")) == (role != "trainer"), (
            f"{role} checkpoint mount readOnly is wrong"
        )
        assert overlay.pod_env(w).get("PALM_RLHF_DATA_DIR") == "/data"
    assert len(set(claims.values())) == 1, f"not one shared claim: {claims}"
    pvc = overlay.get("PersistentVolumeClaim", next(iter(claims.values())))
    assert pvc is not None, f"claim {claims} is not in the build"


def test_base_checkpoint_claim_is_read_write_many(build_overlay):
    """Replicas on several nodes read it; only the single-node demo narrows it."""
    pvc = build_overlay("gpu").get("PersistentVolumeClaim", "palm-rlhf-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_config_map_and_claim_references_resolve(overlay):
    cms = overlay.config_maps()
    claims = {p["metadata"]["name"] for p in overlay.kind("PersistentVolumeClaim")}
    for w in overlay.workloads():
        for c in w.containers():
            for src in c.get("envFrom") or []:
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in cms, f"{w.name}: no ConfigMap {src['configMapRef']}"
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in cms.get(ref["name"], {}), f"{w.name}: no ConfigMap key {ref}"
        for v in w.pod_spec.get("volumes") or []:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{w.name}: no PVC for {v}"


def secret_refs(build):
    for w in build.workloads():
        for c in w.containers():
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield w.name, ref["name"], ref["key"]


def test_secret_references_resolve_or_are_documented(overlay):
    """The demo generates its secrets; other overlays expect ones the docs tell you to create."""
    secrets = {
        s["metadata"]["name"]: {**(s.get("data") or {}), **(s.get("stringData") or {})}
        for s in overlay.kind("Secret")
    }
    docs = DOCS.read_text() if DOCS.exists() else ""
    refs = list(secret_refs(overlay))
    assert refs
    for wname, name, key in refs:
        if name in secrets:
            assert key in secrets[name], f"{wname}: Secret {name} has no key {key}"
        else:
            assert overlay.name != "cpu-demo", f"cpu-demo must be self-contained: {wname} needs Secret {name}"
            assert name in docs and key in docs, (
                f"{overlay.name}: Secret {name} (key {key}) used by {wname} is neither generated nor "
                f"documented in docs/kubernetes.md"
            )


def test_demo_secrets_are_marked_as_placeholders(build_overlay):
    import base64

    build = build_overlay("cpu-demo")
    for s in build.kind("Secret"):
        for key, value in (s.get("data") or {}).items():
            text = base64.b64decode(value).decode()
            assert "CHANGE-ME" in text, (
                f"demo secret {s['metadata']['name']}/{key} is not marked as a placeholder"
            )


def test_who_gets_which_secret(overlay):
    """The admin token goes to the processes that check or send admin RPCs and to the gateway
    (it gates the feedback export); the API keys only to the gateway; the database URL only to
    the processes that use the feedback log."""
    admin = {w for w, n, _ in secret_refs(overlay) if n.startswith("palm-rlhf-admin")}
    keys = {w for w, n, _ in secret_refs(overlay) if n.startswith("palm-rlhf-api-keys")}
    db = {w for w, n, _ in secret_refs(overlay) if n.startswith("palm-rlhf-database")}
    assert admin == {f"palm-rlhf-{r}" for r in ROLES}
    assert keys == {"palm-rlhf-gateway"}
    assert {"palm-rlhf-gateway", "palm-rlhf-trainer"} <= db
    assert not db & {"palm-rlhf-policy", "palm-rlhf-reference", "palm-rlhf-reward"}
    env = overlay.workload("gateway").env()
    assert env["PALM_RLHF_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "url"


# ---------------------------------------------------------------------------------------------
# environment names are read by the code


def manifest_env_names(build) -> set[str]:
    names = set()
    for w in build.workloads():
        for c in w.containers():
            names.update(e["name"] for e in c.get("env") or [])
    for data in build.config_maps().values():
        names.update(data)
    return {n for n in names if n.startswith("PALM_RLHF_")}


def dockerfile_env_names() -> set[str]:
    names = set()
    for path in DOCKERFILES:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.strip().upper().startswith("ENV "):
                names.update(re.findall(r"\b(PALM_RLHF_[A-Z0-9_]+)=", line))
    return names


def test_env_name_check_rejects_unknown_names(code_text):
    """Guards the next test: a name nobody reads must be reported."""
    assert not env_name_is_read("PALM_RLHF_NO_SUCH_SETTING", code_text)


def test_every_palm_rlhf_env_name_is_read_by_the_code(overlay, code_text):
    names = manifest_env_names(overlay) | dockerfile_env_names()
    assert {"PALM_RLHF_PORT", "PALM_RLHF_DATABASE_URL", "PALM_RLHF_ADMIN_TOKEN"} <= names
    unread = sorted(n for n in names if not env_name_is_read(n, code_text))
    assert not unread, f"{overlay.name}: no project code reads {unread}"


# ---------------------------------------------------------------------------------------------
# network policies


def peers_allowed(build, target, port: int) -> set[str] | None:
    """Roles allowed to reach ``target``'s ``port``; None means 'from anywhere'."""
    allowed: set[str] = set()
    ports = target.container_ports()
    for np in build.kind("NetworkPolicy"):
        spec = np["spec"]
        if not selector_matches(spec["podSelector"], target.pod_labels):
            continue
        for rule in spec.get("ingress") or []:
            rule_ports = [ports.get(p.get("port")) for p in rule.get("ports") or []]
            if rule.get("ports") and port not in rule_ports:
                continue
            if not rule.get("from"):
                return None
            for peer in rule["from"]:
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    continue  # other namespaces (Prometheus): not a pod of this system
                allowed.update(w.role for w in build.matching(peer["podSelector"]))
    return allowed


def test_network_policies_select_pods_that_exist(overlay):
    for np in overlay.kind("NetworkPolicy"):
        name = np["metadata"]["name"]
        assert overlay.matching(np["spec"]["podSelector"]), f"NetworkPolicy {name} selects no pod"
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                sel = peer.get("podSelector")
                if sel is None or "namespaceSelector" in peer:
                    continue
                opt_in = all(not k.startswith("app.kubernetes.io/") for k in sel.get("matchLabels") or {})
                if not opt_in:
                    assert overlay.matching(sel), f"NetworkPolicy {name}: peer {sel} matches no pod"
            for p in rule.get("ports") or []:
                targets = overlay.matching(np["spec"]["podSelector"])
                assert any(p["port"] in w.container_ports() for w in targets), (
                    f"NetworkPolicy {name}: port {p['port']} is declared by none of {[w.name for w in targets]}"
                )


def test_every_pod_is_covered_by_a_default_deny(overlay):
    deny = [
        np
        for np in overlay.kind("NetworkPolicy")
        if np["spec"].get("policyTypes") == ["Ingress"] and not np["spec"].get("ingress")
    ]
    assert deny, "no default-deny ingress policy"
    for w in overlay.workloads():
        assert any(selector_matches(np["spec"]["podSelector"], w.pod_labels) for np in deny), (
            f"{w.name} is not under the default deny"
        )


def test_only_the_gateway_is_reachable_from_outside_and_each_service_from_its_callers(overlay):
    expected = {
        "policy": {"gateway", "trainer"},
        "reference": {"trainer"},
        "reward": {"gateway", "trainer"},
        "trainer": {"gateway", "policy", "reward"},
    }
    gw = overlay.workload("gateway")
    assert peers_allowed(overlay, gw, GATEWAY_PORT) is None, "the gateway is not reachable"
    for role, callers in expected.items():
        w = overlay.workload(role)
        got = peers_allowed(overlay, w, GRPC_PORTS[role])
        assert got is not None, f"{role} is open to everyone"
        assert got == callers, f"{role}:{GRPC_PORTS[role]} reachable from {got}, expected {callers}"
        metrics = peers_allowed(overlay, w, METRICS_PORTS[role])
        assert metrics is not None and not metrics, f"{role} metrics open to pods {metrics}"
    for w in overlay.workloads():
        if w.role == "postgres":
            assert peers_allowed(overlay, w, 5432) == {"gateway", "trainer"}


# ---------------------------------------------------------------------------------------------
# security


def test_pods_run_non_root_read_only_without_capabilities(overlay):
    for w in overlay.workloads():
        pod = w.pod_spec.get("securityContext") or {}
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{w.name}: seccomp"
        assert pod.get("runAsNonRoot") is True, f"{w.name}: runAsNonRoot"
        assert pod.get("runAsUser", 0) != 0, f"{w.name}: runs as uid 0"
        assert w.pod_spec.get("automountServiceAccountToken") is False, f"{w.name} mounts an API token"
        for c in w.containers():
            sc = c.get("securityContext") or {}
            where = f"{w.name}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{where}: may run as root"
            assert sc.get("runAsUser", pod.get("runAsUser")) not in (0, None), f"{where}: uid 0"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
            assert "privileged" not in sc or sc["privileged"] is False


def test_palm_containers_get_a_writable_tmp(overlay):
    for w, c in palm_containers(overlay, init=False):
        vols = {v["name"]: v for v in w.pod_spec.get("volumes") or []}
        tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in vols[tmp[0]["name"]], f"{w.name}: /tmp is not an emptyDir"
        assert overlay.pod_env(w, c).get("HOME") == "/tmp"


def test_pod_uid_matches_the_image_user(overlay):
    """The images create uid 10001; the pods must run as that user to own their files."""
    users = set()
    for path in DOCKERFILES:
        users.update(re.findall(r"^USER\s+(\d+)", path.read_text(), flags=re.MULTILINE))
    assert users == {"10001"}, users
    for w, _c in palm_containers(overlay):
        assert w.pod_spec["securityContext"]["runAsUser"] == 10001, w.name


def test_every_container_has_resource_requests_and_memory_limits(overlay):
    for w in overlay.workloads():
        for c in w.containers():
            res = c.get("resources") or {}
            assert {"cpu", "memory"} <= set(res.get("requests") or {}), f"{w.name}/{c['name']}: requests"
            assert "memory" in (res.get("limits") or {}), f"{w.name}/{c['name']}: memory limit"


# ---------------------------------------------------------------------------------------------
# GPU overlay


def test_gpu_overlay_puts_the_gpu_services_on_cuda(build_overlay):
    build = build_overlay("gpu")
    for role in ROLES:
        w = build.workload(role)
        gpus = (w.main.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
        on_gpu = role in ("policy", "reference", "trainer")
        if on_gpu:
            assert gpus == 1, f"{role}: nvidia.com/gpu limit {gpus}"
            assert image_name(w.main["image"]) == "palm-rlhf-cuda"
            assert build.pod_env(w).get("PALM_RLHF_DEVICE") == "cuda"
            assert any(t.get("key") == "nvidia.com/gpu" for t in w.pod_spec.get("tolerations") or [])
        else:
            assert gpus is None, f"{role} asks for a GPU"


def test_cpu_demo_asks_for_no_gpu_and_runs_its_own_database(build_overlay):
    build = build_overlay("cpu-demo")
    for w in build.workloads():
        for c in w.containers():
            for part in ("requests", "limits"):
                assert "nvidia.com/gpu" not in (c.get("resources") or {}).get(part, {}), w.name
    pg = build.workload("postgres")
    assert pg.kind == "StatefulSet" and pg.obj["spec"]["volumeClaimTemplates"]
    svc = build.get("Service", pg.obj["spec"]["serviceName"])
    assert svc is not None and build.service_pods(svc)[0].name == pg.name
    # The database URL of the demo points at that Service.
    import base64

    db = [s for s in build.kind("Secret") if s["metadata"]["name"].startswith("palm-rlhf-database")]
    url = base64.b64decode(db[0]["data"]["url"]).decode()
    assert url.startswith("postgresql://") and f"@{svc['metadata']['name']}:5432/" in url


# ---------------------------------------------------------------------------------------------
# monitoring


def test_service_monitors_select_services_with_the_named_port(overlay):
    monitors = overlay.kind("ServiceMonitor")
    if overlay.name == "monitoring":
        assert len(monitors) == 2
    services = overlay.kind("Service")
    covered = set()
    for sm in monitors:
        selected = [
            s for s in services if selector_matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})
        ]
        assert selected, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            for s in selected:
                assert ep["port"] in [p.get("name") for p in s["spec"]["ports"]], (
                    f"{sm['metadata']['name']}: Service {s['metadata']['name']} has no port {ep['port']}"
                )
        covered.update(s["metadata"]["name"] for s in selected)
    if monitors:
        assert covered == {f"palm-rlhf-{r}" for r in ROLES}


def dashboard() -> dict:
    return json.loads((REPO / "k8s" / "base" / "grafana" / "palm-rlhf-dashboard.json").read_text())


def dashboard_metric_names() -> set[str]:
    names = set()
    for panel in dashboard()["panels"]:
        for t in panel.get("targets") or []:
            names.update(re.findall(r"\b((?:palm_rlhf|gateway)_[a-z0-9_]+)\b", t["expr"]))
    return names


def metric_family(sample: str) -> str:
    """Exposed sample name -> the name given to prometheus_client."""
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def test_dashboard_ships_in_a_config_map(overlay):
    cm = overlay.get("ConfigMap", "palm-rlhf-grafana-dashboard")
    assert cm is not None and cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    assert json.loads(cm["data"]["palm-rlhf-dashboard.json"]) == dashboard()


def test_dashboard_covers_the_operating_questions():
    names = dashboard_metric_names()
    wanted = {
        "request rate": "gateway_requests_total",
        "latency": "gateway_request_latency_seconds_bucket",
        "model-service latency": "palm_rlhf_grpc_request_seconds_bucket",
        "tokens/s": "palm_rlhf_tokens_generated_total",
        "batch size": "palm_rlhf_batch_size_bucket",
        "policy version": "palm_rlhf_model_version",
        "feedback counts": "gateway_feedback_total",
    }
    missing = {k: v for k, v in wanted.items() if v not in names}
    assert not missing, f"dashboard lacks {missing}"
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_metrics_are_exported_by_the_code(code_text):
    unknown = sorted(n for n in dashboard_metric_names() if f'"{metric_family(n)}"' not in code_text)
    assert not unknown, f"the dashboard queries metrics no code exports: {unknown}"


def test_docs_cover_the_operations():
    text = DOCS.read_text()
    for needle in (
        "kubectl apply -k k8s/overlays/cpu-demo",
        "docker build",
        "ReadWriteMany",
        "nvidia.com/gpu",
        "rollback",
        "LoadVersion",
        "PALM_RLHF_ADMIN_TOKEN",
        "scale deploy/palm-rlhf-",
    ):
        assert needle in text, f"docs/kubernetes.md does not mention {needle!r}"
