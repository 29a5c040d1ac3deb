"""The Kubernetes manifests in deploy/k8s, checked without a cluster.

Every YAML document is checked field by field against the OpenAPI models of the official
`kubernetes` Python client (no unknown field, every value of the declared type, annotations and
ConfigMap values as strings), then deserialized into those typed models, which reject a missing
required field. The tests then assert what tokenrelay depends on: the probes' paths and ports,
the worker's drain window against TOKENRELAY_SHUTDOWN_GRACE_SECONDS, the SSE-safe ingress, the
autoscalers' targets and metric names, and that kustomization.yaml lists every file.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml
from kubernetes.utils import parse_quantity

from tokenrelay.broker.keys import Keys
from tokenrelay.broker.queue import GROUP
from tokenrelay.broker.settings import Settings
from tokenrelay.broker.telemetry import RUNS_ACTIVE

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

# (apiVersion, kind) -> the client's model. Only these kinds are shipped; anything else (a typo,
# a removed API version such as autoscaling/v2beta2) fails.
KINDS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
}

# `uvicorn.run(..., timeout_graceful_shutdown=5)` for `tokenrelay api` (tokenrelay/producer/cli.py).
API_GRACEFUL_SHUTDOWN_SECONDS = 5


# --- loading -------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass(frozen=True)
class Manifest:
    file: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.file}:{self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.y*ml") if p.name != KUSTOMIZATION.name)


@cache
def load_all() -> tuple[Manifest, ...]:
    out: list[Manifest] = []
    for path in manifest_files():
        docs = list(yaml.load_all(path.read_text(), Loader=StrictLoader))
        assert docs, f"{path.name}: no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping: {doc!r}"
            out.append(Manifest(path.name, doc))
    return tuple(out)


def the(kind: str, name: str) -> Manifest:
    found = [m for m in load_all() if m.kind == kind and m.name == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[Manifest]:
    return [m for m in load_all() if m.kind == kind]


# --- validation against the client's OpenAPI models -------------------------------------------

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str, datetime, date),
}


def schema_errors(value: Any, type_name: str, path: str) -> Iterator[str]:
    """Every place where `value` does not fit the client's OpenAPI type `type_name`."""
    if value is None:
        yield f"{path}: no value (null)"
    elif type_name == "object":  # IntOrString, free-form JSON
        return
    elif type_name.startswith("list["):
        if not isinstance(value, list):
            yield f"{path}: expected a list, got {type(value).__name__}"
            return
        inner = type_name[len("list[") : -1]
        for i, item in enumerate(value):
            yield from schema_errors(item, inner, f"{path}[{i}]")
    elif type_name.startswith(("dict(str, ", "dict[str, ")):  # the notation varies by release
        if not isinstance(value, dict):
            yield f"{path}: expected a mapping, got {type(value).__name__}"
            return
        inner = type_name[len("dict(str, ") : -1]
        for key, item in value.items():
            if not isinstance(key, str):
                yield f"{path}: key {key!r} is not a string"
            yield from schema_errors(item, inner, f"{path}.{key}")
    elif type_name in PRIMITIVES:
        wanted = PRIMITIVES[type_name]
        # YAML `true` is a bool, and bool is an int in Python: never accept one for the other.
        if isinstance(value, bool) != (bool in wanted) or not isinstance(value, wanted):
            yield f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"
    else:
        model = getattr(k8s, type_name)
        if not isinstance(value, dict):
            yield f"{path}: expected a {type_name} mapping, got {type(value).__name__}"
            return
        fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
        for key, item in value.items():
            if key not in fields:
                yield f"{path}: unknown field {key!r} for {type_name}"
                continue
            yield from schema_errors(item, model.openapi_types[fields[key]], f"{path}.{key}")


class _Response:
    """What ApiClient.deserialize reads: a body in `.data`."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc)


@cache
def api_client() -> k8s.ApiClient:
    return k8s.ApiClient()


def typed(doc: dict[str, Any]) -> Any:
    """`doc` as the client's typed model; raises ValueError for a missing required field."""
    model = KINDS[(doc.get("apiVersion"), doc.get("kind"))]
    return api_client().deserialize(_Response(doc), model)


def validate(doc: dict[str, Any]) -> list[str]:
    """All schema errors of one document (empty when it is a valid object of a shipped kind)."""
    model = KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if model is None:
        return [f"unknown apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}"]
    errors = list(schema_errors(doc, model, doc["kind"]))
    if not errors:
        try:
            obj = typed(doc)
        except ValueError as exc:  # the models' required-field checks
            return [f"{doc['kind']}: {exc}"]
        if not (obj.metadata and obj.metadata.name):
            errors.append(f"{doc['kind']}: metadata.name is required")
        if "status" in doc:
            errors.append(f"{doc['kind']}: status is set by the cluster, not by a manifest")
    return errors


# --- helpers on typed objects -------------------------------------------------------------


def typed_of(kind: str, name: str) -> Any:
    return typed(the(kind, name).doc)


def config_data() -> dict[str, str]:
    data: dict[str, str] = typed_of("ConfigMap", "tokenrelay-config").data
    return data


def secret_data() -> dict[str, str]:
    data: dict[str, str] = typed_of("Secret", "tokenrelay-secrets").string_data
    return data


def only_container(deployment: Any) -> Any:
    containers = deployment.spec.template.spec.containers
    assert len(containers) == 1, f"{deployment.metadata.name}: expected one container"
    return containers[0]


def container_port(container: Any, port: int | str) -> int:
    """A probe's or Service's port (a number or a named port) resolved on `container`."""
    if isinstance(port, int):
        assert port in [p.container_port for p in container.ports or []], (
            f"port {port} is not declared by container {container.name}"
        )
        return port
    for p in container.ports or []:
        if p.name == port:
            return int(p.container_port)
    raise AssertionError(f"container {container.name} has no port named {port!r}")


def pre_stop_seconds(container: Any) -> int:
    """How long the container's preStop hook holds SIGTERM back (a `sleep`), 0 without one."""
    hook = container.lifecycle.pre_stop if container.lifecycle else None
    if hook is None:
        return 0
    if hook.sleep:
        return int(hook.sleep.seconds)
    command = hook._exec.command
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
    return int(command[1])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def deployments() -> list[Any]:
    return [typed(m.doc) for m in of_kind("Deployment")]


# --- the tests ----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_once() -> None:
    kustomization = yaml.load(KUSTOMIZATION.read_text(), Loader=StrictLoader)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), f"listed twice: {resources}"
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), f"kustomization.yaml lists a missing {resource}"
    assert set(resources) == {p.name for p in manifest_files()}


@pytest.mark.parametrize("manifest", load_all(), ids=lambda m: m.id)
def test_every_document_is_a_valid_kubernetes_object(manifest: Manifest) -> None:
    assert validate(manifest.doc) == []
    labels = manifest.doc["metadata"].get("labels", {})
    assert labels.get("app.kubernetes.io/name") == "tokenrelay"


def test_names_are_unique_per_kind() -> None:
    keys = [(m.kind, m.name) for m in load_all()]
    assert len(keys) == len(set(keys))


def _bad(mutate: Any) -> dict[str, Any]:
    doc = copy.deepcopy(the("Deployment", "tokenrelay-api").doc)
    mutate(doc)
    return doc


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (  # YAML `true`: the API server rejects a non-string annotation
            _bad(lambda d: d["spec"]["template"]["metadata"]["annotations"].update(x=True)),
            "expected str, got bool",
        ),
        (_bad(lambda d: _container(d).update(readinessprobe={})), "unknown field 'readinessprobe'"),
        (_bad(lambda d: _container(d).pop("name")), "`name`, must not be `None`"),
        (_bad(lambda d: _container(d)["ports"][0].update(containerPort="2024")), "expected int"),
        (_bad(lambda d: d["spec"].pop("selector")), "`selector`, must not be `None`"),
        (_bad(lambda d: d.update(apiVersion="extensions/v1beta1")), "unknown apiVersion/kind"),
    ],
    ids=["bool-annotation", "unknown-field", "no-name", "port-string", "no-selector", "old-api"],
)
def test_the_validator_rejects_broken_manifests(broken: dict[str, Any], expected: str) -> None:
    errors = validate(broken)
    assert any(expected in e for e in errors), errors


def test_duplicate_yaml_keys_are_rejected() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("a: 1\na: 2\n", Loader=StrictLoader)


def test_configmap_and_secret_are_tokenrelay_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config, secret = config_data(), secret_data()
    cli_source = (ROOT / "tokenrelay" / "producer" / "cli.py").read_text()
    cli_env = set(re.findall(r'"(TOKENRELAY_\w+)"', cli_source))
    for key in [*config, *secret]:
        field = key.removeprefix("TOKENRELAY_").lower()
        assert key.startswith("TOKENRELAY_"), key
        assert field in Settings.model_fields or key in cli_env, f"{key} is not a setting"

    # The checkpointer URL and the API keys come from the Secret only.
    assert set(secret) == {
        "TOKENRELAY_CHECKPOINTER", "TOKENRELAY_API_KEYS", "TOKENRELAY_STREAM_TOKEN_SECRET"
    }  # fmt: skip
    assert not set(secret) & set(config)

    for key in list(os.environ):
        if key.startswith("TOKENRELAY_"):
            monkeypatch.delenv(key)
    for key, value in {**config, **secret}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # what both processes will read
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.checkpointer.startswith("postgresql://")
    assert settings.shutdown_grace_seconds == 30
    assert settings.heartbeat_seconds > 0
    assert settings.retention_seconds > 0
    assert settings.lease_seconds > 0
    assert settings.stream_max_seconds >= 0
    assert settings.api_keys and all(settings.api_keys)
    assert isinstance(settings.cors_origins, list)
    assert settings.key_prefix
    assert settings.graphs == {"agent": "tokenrelay.producer.demo:graph"}


def test_both_deployments_read_the_configmap_and_the_secret() -> None:
    for deployment in deployments():
        container = only_container(deployment)
        refs = [
            ("configmap", s.config_map_ref.name)
            if s.config_map_ref
            else ("secret", s.secret_ref.name)
            for s in container.env_from
        ]
        # The Secret comes last, so its keys override the ConfigMap's.
        assert refs == [("configmap", "tokenrelay-config"), ("secret", "tokenrelay-secrets")]
        assert not container.env, "settings belong in the ConfigMap or the Secret"


def test_api_deployment() -> None:
    api = typed_of("Deployment", "tokenrelay-api")
    pod = api.spec.template
    assert selects(api.spec.selector.match_labels, pod.metadata.labels)
    container = only_container(api)
    assert container.image == "tokenrelay:latest"
    assert container.command == [
        "tokenrelay", "api", "--host", "0.0.0.0", "--port", "2024", "--workers", "1"
    ]  # fmt: skip
    assert container_port(container, "http") == 2024

    ready, live = container.readiness_probe.http_get, container.liveness_probe.http_get
    assert (ready.path, container_port(container, ready.port)) == ("/readyz", 2024)
    assert (live.path, container_port(container, live.port)) == ("/healthz", 2024)

    # Endpoints are removed before SIGTERM, and the shutdown fits in the grace period.
    pre_stop = pre_stop_seconds(container)
    assert pre_stop >= 5
    assert pre_stop + API_GRACEFUL_SHUTDOWN_SECONDS < pod.spec.termination_grace_period_seconds
    assert pod.spec.termination_grace_period_seconds <= 60

    annotations = pod.metadata.annotations
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == 2024


def test_worker_deployment_outlives_its_drain() -> None:
    worker = typed_of("Deployment", "tokenrelay-worker")
    pod = worker.spec.template
    assert selects(worker.spec.selector.match_labels, pod.metadata.labels)
    container = only_container(worker)
    assert container.image == "tokenrelay:latest"
    assert container.command == [
        "tokenrelay", "worker", "--metrics-port", "9100", "--processes", "1"
    ]  # fmt: skip
    assert container_port(container, "metrics") == 9100

    live = container.liveness_probe
    assert live.tcp_socket or live._exec, "the worker needs a liveness probe"
    if live.tcp_socket:
        assert container_port(container, live.tcp_socket.port) == 9100

    drain = float(config_data()["TOKENRELAY_SHUTDOWN_GRACE_SECONDS"])
    # SIGKILL must not come before the drain and the hand-back are over.
    grace = pod.spec.termination_grace_period_seconds
    assert grace >= pre_stop_seconds(container) + drain + 15

    annotations = pod.metadata.annotations
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 9100


def test_pods_are_non_root_and_sized() -> None:
    for deployment in deployments():
        pod = deployment.spec.template.spec
        assert pod.security_context.run_as_non_root is True
        assert pod.security_context.run_as_user not in (None, 0)
        assert pod.automount_service_account_token is False
        for container in pod.containers:
            sc = container.security_context
            assert sc.allow_privilege_escalation is False
            assert sc.capabilities.drop == ["ALL"]
            if sc.read_only_root_filesystem:
                assert "/tmp" in [m.mount_path for m in container.volume_mounts or []]
            requests, limits = container.resources.requests, container.resources.limits
            assert parse_quantity(requests["cpu"]) > 0
            assert parse_quantity(requests["memory"]) > 0
            assert parse_quantity(limits["memory"]) >= parse_quantity(requests["memory"])


def _pod_labels(name: str) -> dict[str, str]:
    labels: dict[str, str] = typed_of("Deployment", name).spec.template.metadata.labels
    return labels


def test_api_service_routes_port_80_to_2024() -> None:
    service = typed_of("Service", "tokenrelay-api")
    assert selects(service.spec.selector, _pod_labels("tokenrelay-api"))
    assert not selects(service.spec.selector, _pod_labels("tokenrelay-worker"))
    [port] = service.spec.ports
    assert port.port == 80
    api = only_container(typed_of("Deployment", "tokenrelay-api"))
    assert container_port(api, port.target_port) == 2024


def test_worker_metrics_service_is_headless() -> None:
    service = typed_of("Service", "tokenrelay-worker-metrics")
    assert service.spec.cluster_ip == "None"
    assert selects(service.spec.selector, _pod_labels("tokenrelay-worker"))
    assert not selects(service.spec.selector, _pod_labels("tokenrelay-api"))
    [port] = service.spec.ports
    worker = only_container(typed_of("Deployment", "tokenrelay-worker"))
    assert port.port == container_port(worker, port.target_port) == 9100


def test_every_pod_has_a_disruption_budget() -> None:
    budgets = [typed(m.doc) for m in of_kind("PodDisruptionBudget")]
    for deployment in deployments():
        labels = deployment.spec.template.metadata.labels
        matching = [b for b in budgets if selects(b.spec.selector.match_labels, labels)]
        assert len(matching) == 1, deployment.metadata.name


def _hpa_for(deployment: str) -> Any:
    hpas = [typed(m.doc) for m in of_kind("HorizontalPodAutoscaler")]
    found = [h for h in hpas if h.spec.scale_target_ref.name == deployment]
    assert len(found) == 1, f"expected one HPA for {deployment}"
    hpa = found[0]
    assert hpa.spec.scale_target_ref.kind == "Deployment"
    assert hpa.spec.scale_target_ref.api_version == "apps/v1"
    assert 1 <= hpa.spec.min_replicas <= hpa.spec.max_replicas
    # `kubectl apply` would reset the autoscaler's choice to a replicas: in the manifest.
    assert "replicas" not in the("Deployment", deployment).doc["spec"]
    return hpa


def test_api_autoscales_on_cpu() -> None:
    hpa = _hpa_for("tokenrelay-api")
    [metric] = hpa.spec.metrics
    assert metric.type == "Resource"
    assert metric.resource.name == "cpu"
    assert metric.resource.target.type == "Utilization"
    assert 0 < metric.resource.target.average_utilization <= 100
    # Utilization is relative to the requests: every container must request CPU.
    for container in typed_of("Deployment", "tokenrelay-api").spec.template.spec.containers:
        assert "cpu" in container.resources.requests


def test_workers_autoscale_on_the_queue() -> None:
    hpa = _hpa_for("tokenrelay-worker")
    by_type = {m.type: m for m in hpa.spec.metrics}
    assert set(by_type) == {"External", "Pods"}

    external = by_type["External"].external
    assert external.metric.name == "tokenrelay_queue_depth"
    assert parse_quantity(external.target.average_value) > 0

    pods = by_type["Pods"].pods
    assert pods.metric.name == RUNS_ACTIVE._name == "tokenrelay_worker_runs_active"
    concurrency = Decimal(config_data()["TOKENRELAY_WORKER_CONCURRENCY"])
    # Below the concurrency, or the workers would have to be full before scaling out.
    assert 0 < parse_quantity(pods.target.average_value) < concurrency


def test_readme_documents_the_queue_metric() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    queue = Keys(config_data()["TOKENRELAY_KEY_PREFIX"]).queue()
    for needle in [
        "kubectl apply -k deploy/k8s",
        "tokenrelay_queue_depth",
        "redis_stream_group_lag",
        f'stream="{queue}"',
        f'group="{GROUP}"',
        RUNS_ACTIVE._name,
        "TOKENRELAY_GRAPHS",
    ]:
        assert needle in readme, needle


def test_ingress_is_safe_for_server_sent_events() -> None:
    ingress = typed_of("Ingress", "tokenrelay")
    notes = ingress.metadata.annotations
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-http-version"] == "1.1"
    heartbeat = float(config_data()["TOKENRELAY_HEARTBEAT_SECONDS"])
    assert int(notes[prefix + "proxy-read-timeout"]) > heartbeat
    assert int(notes[prefix + "proxy-send-timeout"]) > heartbeat
    assert not any("gzip on" in value for value in notes.values())

    service = typed_of("Service", "tokenrelay-api")
    api = only_container(typed_of("Deployment", "tokenrelay-api"))
    backends = [p.backend.service for r in ingress.spec.rules for p in r.http.paths]
    assert backends
    for backend in backends:
        assert backend.name == service.metadata.name
        [port] = [
            p
            for p in service.spec.ports
            if backend.port.name == p.name or backend.port.number == p.port
        ]
        assert container_port(api, port.target_port) == 2024
