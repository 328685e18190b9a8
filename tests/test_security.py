"""Security defaults, shown on a real TorchServe (one start for the module) and on the source.

- every TCP port the JVM (and its workers) listens on is loopback, and the management API answers on none of them,
  even to a request carrying the valid management key; it answers only on the private unix socket (the positive
  control that proves the probe would have seen it);
- TorchServe's gRPC management service (0.12 always starts it, on a loopback port) refuses real gRPC calls
  (ListModels, ScaleWorker, UnregisterModel) without the management key, in the DEFAULT configuration (client token
  authorization off) and with it on; with the key (which only the owner of the 0700 state directory can read) the same
  call succeeds, which proves the refusal is the lock and not a wrong address;
- model registration is refused, from a remote URL, from a file outside the store, and from the store itself
  (`enable_model_api=false`); `allowed_urls` admits only `.mar` files of the configured store;
- token authorization `on`: no token / a wrong token → 401, the right token → 200, through the front and on
  TorchServe's internal port;
- `torch.load` in training/ (and anywhere in the package) always passes `weights_only=True`; no pickle in serving/.

The module's service runs with `token_auth="on"` (the only difference from the defaults: auth does not change which
addresses anything binds); `test_default_configuration_binds_loopback_only` checks the defaults themselves.
"""

from __future__ import annotations

import ast
import http.client
import ipaddress
import json
import re
import socket
from pathlib import Path

import psutil
import pytest
import requests
from conftest import REPO_ROOT, running_service

from serving.hosts.torchserve.server import ServeConfig, render_properties

pytestmark = pytest.mark.slow  # starts a real TorchServe


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    with running_service(
        tmp_path_factory,
        model=str(tiny_model_dir),
        token_auth="on",
        intra_op_threads=1,
    ) as host:
        yield host


@pytest.fixture(scope="module")
def keys(service) -> dict[str, str]:
    data = json.loads(service.key_file.read_text())
    return {"inference": data["inference"]["key"], "management": data["management"]["key"]}


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def _unix_request(path: Path, method: str, target: str, token: str) -> tuple[int, str]:
    conn = _UnixHTTPConnection(str(path))
    try:
        conn.request(method, target, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _listening(service) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP listening socket of the JVM and its children."""
    jvm = psutil.Process(service.process.pid)
    found = []
    for proc in [jvm, *jvm.children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((conn.laddr.ip, conn.laddr.port, proc.pid))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # the JVM reports ::ffff:127.0.0.1 for an IPv4 loopback bind
    return (mapped or ip).is_loopback


def test_every_listening_port_is_loopback(service):
    listening = _listening(service)
    assert listening, "the JVM listens on nothing? (psutil could not see its sockets)"
    exposed = [entry for entry in listening if not _is_loopback(entry[0])]
    assert not exposed, f"non-loopback listeners: {exposed}"
    ports = {port for _, port, _ in listening}
    assert service.backend_port in ports
    assert service.config.management_port not in ports
    front = psutil.Process().net_connections(kind="inet")
    front_listen = [c for c in front if c.status == psutil.CONN_LISTEN and c.laddr.port == service.config.port]
    assert front_listen and all(_is_loopback(c.laddr.ip) for c in front_listen)


def test_management_api_answers_on_no_tcp_port(service, keys):
    """Ask every TCP port of the JVM and the front for the model list, with the valid management key."""
    management_socket = service.state / "management.sock"
    status, body = _unix_request(management_socket, "GET", "/models", keys["management"])
    assert status == 200 and service.config.model_name in body, "positive control: the unix socket must answer"
    grpc_ports = set(_grpc_ports(service).values())
    ports = ({port for _, port, _ in _listening(service)} | {service.config.port}) - grpc_ports
    headers = {"Authorization": f"Bearer {keys['management']}"}
    for port in sorted(ports):
        # Every non-gRPC port speaks HTTP/1.1: a connection error here would hide a door, so it fails the test.
        response = requests.get(f"http://127.0.0.1:{port}/models", headers=headers, timeout=5)
        assert not (response.status_code == 200 and '"models"' in response.text), f"management API on TCP {port}"
        described = requests.get(
            f"http://127.0.0.1:{port}/models/{service.config.model_name}", headers=headers, timeout=5
        )
        assert described.status_code != 200 or "workers" not in described.text, f"describe-model on TCP {port}"


# ------------------------------------------------------------------------------------------------------ gRPC
GRPC_MANAGEMENT = "/org.pytorch.serve.grpc.management.ManagementAPIsService/"


def _grpc_ports(host) -> dict[str, int]:
    """The gRPC ports TorchServe was told to use (from the generated config.properties)."""
    props = dict(
        line.split("=", 1) for line in (host.state / "config.properties").read_text().splitlines() if "=" in line
    )
    return {kind: int(props[f"grpc_{kind}_port"]) for kind in ("inference", "management")}


def _pb_string(field: int, value: str) -> bytes:
    """One protobuf string field (wire type 2): enough to build the management requests without generated stubs."""
    data = value.encode()
    return bytes([field << 3 | 2, len(data)]) + data


def _grpc_call(port: int, method: str, request: bytes, token: str | None) -> tuple[object, bytes]:
    """A real unary gRPC call on TorchServe's management service; (status code, response bytes)."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(GRPC_MANAGEMENT + method)
        try:
            response = call(request, metadata=metadata, timeout=20, wait_for_ready=True)
        except grpc.RpcError as exc:
            return exc.code(), (exc.details() or "").encode()
    return grpc.StatusCode.OK, response


def _management_key(host) -> str:
    return json.loads(host.key_file.read_text())["management"]["key"]


def _check_grpc_management_locked(host) -> None:
    import grpc

    port = _grpc_ports(host)["management"]
    name = host.config.model_name
    listening = {p for _, p, _ in _listening(host)}
    assert port in listening, f"TorchServe does not listen on its gRPC management port {port}: probe is off target"
    calls = {
        "ListModels": bytes([1 << 3, 100]),  # limit=100 (proto3 sends 0 when absent, and 0 lists nothing)
        "ScaleWorker": _pb_string(1, name) + bytes([3 << 3, 3, 4 << 3, 3]),  # model_name, max/min_worker=3
        "UnregisterModel": _pb_string(1, name),
    }
    for token in (None, "wrong-key", host.inference_token()):  # the inference key is not the management key
        for method, request in calls.items():
            code, detail = _grpc_call(port, method, request, token)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, token, code, detail)
            assert b"Token Authorization failed" in detail, (method, detail)
    management_key = _management_key(host)  # positive control: the refusals come from the lock, not a wrong port
    code, answer = _grpc_call(port, "ListModels", calls["ListModels"], management_key)
    assert code == grpc.StatusCode.OK and name.encode() in answer, (code, answer)
    status, body = _unix_request(host.state / "management.sock", "GET", f"/models/{name}", management_key)
    described = json.loads(body)[0]  # nothing changed: still registered, still one worker
    assert status == 200 and described["minWorkers"] == described["maxWorkers"] == 1, body


def test_grpc_management_refuses_calls_with_token_auth_on(service):
    _check_grpc_management_locked(service)


@pytest.fixture(scope="module")
def default_service(tiny_model_dir, tmp_path_factory):
    """The shipped defaults: loopback, client token authorization `auto` (= off), management `off`."""
    with running_service(tmp_path_factory, model=str(tiny_model_dir), intra_op_threads=1) as host:
        assert not host.config.auth_enabled
        yield host


def test_grpc_management_refuses_calls_in_the_default_configuration(default_service):
    """The door the issue found: gRPC management on loopback with token authorization off. Closed: TorchServe always
    checks its keys; clients of the default service still need no token because the front adds the inference key."""
    _check_grpc_management_locked(default_service)
    response = requests.post(
        f"{default_service.config.base_url}/predictions/{default_service.config.model_name}",
        data=_png(),
        headers={"Authorization": "Bearer anything"},  # a client header is replaced, not trusted
        timeout=30,
    )
    assert response.status_code == 200 and "cluster" in response.json()[0], response.text


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/evil.mar",
        "file:///tmp/evil.mar",
        "http://127.0.0.1:1/evil.mar",
    ],
)
def test_model_registration_is_refused(service, keys, url):
    target = f"/models?url={requests.utils.quote(url, safe='')}&initial_workers=1"
    status, body = _unix_request(service.state / "management.sock", "POST", target, keys["management"])
    assert 400 <= status < 500, (status, body)
    status, body = _unix_request(service.state / "management.sock", "GET", "/models", keys["management"])
    assert "evil" not in body


def test_registration_of_the_stores_own_archive_is_refused_too(service, keys):
    """`enable_model_api=false`: even an archive from the configured store cannot be (re)registered or deleted."""
    mar = f"{service.config.model_name}.mar"
    status, body = _unix_request(service.state / "management.sock", "POST", f"/models?url={mar}", keys["management"])
    assert 400 <= status < 500, (status, body)
    target = f"/models/{service.config.model_name}"
    status, body = _unix_request(service.state / "management.sock", "DELETE", target, keys["management"])
    assert 400 <= status < 500, (status, body)


def test_allowed_urls_admit_only_the_configured_store(service):
    """TorchServe checks model URLs against `allowed_urls` (a regex): only `.mar` files directly in our store."""
    properties = (service.state / "config.properties").read_text()
    line = next(x for x in properties.splitlines() if x.startswith("allowed_urls="))
    pattern = line.split("=", 1)[1].replace("\\\\", "\\")
    store = str(service.archive_dir)
    assert re.fullmatch(pattern, f"file://{store}/{service.config.model_name}.mar")
    for url in [
        "https://example.com/x.mar",
        f"file://{store}/../x.mar",
        f"file://{store}/sub/x.mar",
        f"file://{store}x/x.mar",
        f"file://{store}/x.mar.zip",
        "file:///tmp/x.mar",
    ]:
        assert not re.fullmatch(pattern, url), url
    assert "enable_model_api=false" in properties and "install_py_dep_per_model=false" in properties


def test_token_authorization_on(service, keys):
    """Through the front (what clients use): 401 + `WWW-Authenticate: Bearer` + a JSON error for no token, a wrong
    one, or the management key; 200 with the inference key. TorchServe's own port refuses the same requests too
    (with its 400 `InvalidKeyException`, which the front turns into the 401)."""
    image = next((REPO_ROOT.parent / "shared" / "data").rglob("*.jpg"), None)
    data = image.read_bytes() if image else _png()
    headers = {"Content-Type": "application/octet-stream"}
    refused = [{}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Bearer {keys['management']}"}]
    front = f"{service.config.base_url}/predictions/{service.config.model_name}"
    direct = f"http://127.0.0.1:{service.backend_port}/predictions/{service.config.model_name}"
    for extra in refused:
        response = requests.post(front, data=data, headers={**headers, **extra}, timeout=30)
        assert response.status_code == 401, (extra, response.status_code, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthorized"
        backend = requests.post(direct, data=data, headers={**headers, **extra}, timeout=30)
        assert backend.status_code in (400, 401) and "InvalidKeyException" in backend.text
    with requests.Session() as session:  # keep-alive survives a refused request
        right = {**headers, "Authorization": f"Bearer {keys['inference']}"}
        assert session.post(front, data=data, headers=headers, timeout=30).status_code == 401
        response = session.post(front, data=data, headers=right, timeout=30)
        assert response.status_code == 200 and "cluster" in response.json()[0], response.text
    assert requests.post(direct, data=data, headers=right, timeout=30).status_code == 200
    assert oct(service.key_file.stat().st_mode & 0o777) == "0o600"
    assert oct(service.state.stat().st_mode & 0o777) == "0o700"


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_default_configuration_binds_loopback_only(tmp_path, tiny_model_dir):
    """The shipped defaults (no overrides): every address in the generated TorchServe config is loopback or a unix
    socket, registration and per-model pip installs are off, token auth is off only because all of that holds."""
    config = ServeConfig(model=str(tiny_model_dir), cache_dir=tmp_path)
    assert config.host == "127.0.0.1" and config.metrics_host == "127.0.0.1" and config.management == "off"
    properties = dict(
        line.split("=", 1) for line in render_properties(config, tmp_path, tmp_path).splitlines() if "=" in line
    )
    assert properties["management_address"].startswith("unix:")
    for key in ("inference_address", "metrics_address"):
        assert properties[key].startswith("http://127.0.0.1:"), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert properties[key] == "127.0.0.1", key
    assert properties["enable_model_api"] == "false"
    assert properties["install_py_dep_per_model"] == "false"
    assert properties["enable_envvars_config"] == "false"
    # TorchServe always checks its keys (the lock on gRPC management); the front authorizes forwarded requests.
    assert properties["disable_token_authorization"] == "false"
    assert not config.auth_enabled
    exposed = ServeConfig(model=str(tiny_model_dir), cache_dir=tmp_path, host="0.0.0.0")
    assert exposed.auth_enabled
    assert "disable_token_authorization=false" in render_properties(exposed, tmp_path, tmp_path)


# ------------------------------------------------------------------------------------------------- source
def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO_ROOT / folder).rglob("*.py"))]


def test_every_torch_load_uses_weights_only():
    """Parse (not grep) the code: each `torch.load(...)` call passes `weights_only=True` literally."""
    calls, offenders = 0, []
    for path in _python_files("training", "deepclust", "serving", "benchmarks"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", "") == "torch":
                calls += 1
                weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert calls >= 1, "no torch.load found: the check is looking in the wrong place"
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_no_pickle_and_no_torch_in_serving():
    for path in _python_files("serving"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"pickle", "dill", "cloudpickle", "joblib", "torch", "training"}, (path, name)
        assert "allow_pickle=True" not in path.read_text(), path


# --------------------------------------------------------------------------- token auth on a real exposed service
def _non_loopback_address(family: int) -> str | None:
    """An address of this machine that is not loopback (to reach a 0.0.0.0 / :: bind the way another host would)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family == family:
                ip = ipaddress.ip_address(entry.address.split("%")[0])
                if not ip.is_loopback and not ip.is_link_local:
                    return str(ip)
    return None


@pytest.mark.parametrize(
    ("settings", "family"),
    [
        ({"host": "0.0.0.0", "management": "loopback"}, socket.AF_INET),
        ({"host": "::"}, socket.AF_INET6),
        ({"metrics_host": "0.0.0.0"}, None),  # only the metrics public: auth still turns on
    ],
    ids=["ipv4-any", "ipv6-any", "metrics-only"],
)
def test_exposed_service_requires_the_token(tiny_model_dir, tmp_path_factory, tmp_path, settings, family):
    """A real service bound beyond loopback with the DEFAULT `token_auth: auto`: 401 without a token or with a wrong
    one, 200 with the inference key, through the front on its public address; `deepclust predict --key-file` works
    against it; with `--management loopback` the management API answers on 127.0.0.1 only with its key."""
    import subprocess
    import sys

    with running_service(tmp_path_factory, model=str(tiny_model_dir), intra_op_threads=1, **settings) as host:
        assert host.config.auth_enabled  # auto turned it on
        target = "127.0.0.1"
        if family is not None:
            target = _non_loopback_address(family) or ("::1" if family == socket.AF_INET6 else "127.0.0.1")
        url = f"http://{target if ':' not in target else f'[{target}]'}:{host.config.port}"
        predictions = f"{url}/predictions/{host.config.model_name}"
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            response = requests.post(predictions, data=_png(), headers=headers, timeout=30)
            assert response.status_code == 401, (headers, response.status_code, response.text)
        right = {"Authorization": f"Bearer {host.inference_token()}"}
        response = requests.post(predictions, data=_png(), headers=right, timeout=30)
        assert response.status_code == 200 and "cluster" in response.json()[0], response.text

        image = tmp_path / "x.png"
        image.write_bytes(_png())
        cli = [sys.executable, "-m", "deepclust.cli", "predict", str(image), "--url", url]
        cli += ["--model", host.config.model_name]
        refused = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0, refused.stdout
        accepted = subprocess.run([*cli, "--key-file", str(host.key_file)], capture_output=True, text=True, timeout=60)
        assert accepted.returncode == 0, accepted.stderr
        assert "cluster" in json.loads(accepted.stdout.splitlines()[0])

        if host.config.management == "loopback":
            management = f"http://127.0.0.1:{host.config.management_port}/models"
            assert requests.get(management, timeout=10).status_code in (400, 401)
            key = json.loads(host.key_file.read_text())["management"]["key"]
            listed = requests.get(management, headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert listed.status_code == 200 and host.config.model_name in listed.text
            bound = [a for a, p, _ in _listening(host) if p == host.config.management_port]
            assert bound and all(_is_loopback(a) for a in bound), bound
